"""`export(model, out, to)`: checks, then one target's exporter writing into a staging folder that becomes `out`.

Siblings: the exporters `opt_export.onnx`, `opt_export.saved_model` (SavedModel and LiteRT) and
`opt_export.stablehlo`, imported only when their target is asked for, so a bad argument is refused before any
framework loads.

An export folder is self-describing: the runtime's files, `export.json` (target, inputs and outputs with their
names, dtypes and shapes, named axes dynamic, how to run it), and the model's `config.json`,
`generation_config.json` and tokenizer files. It is written beside `out` under a hidden temporary name and renamed
into place in one step (as `conversion` does), so a crash leaves no half-written `out`; the staging folders of
killed exports are removed by the next export to the same place.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from opt_core.config import OPTConfig
from opt_core.errors import ConfigError, OPTError
from opt_core.files import TEMPORARY_SUFFIX, fsync_directory, fsync_file, remove_partials, stale_partials
from opt_core.hub import resolve_model
from opt_core.quantization import is_quantized
from opt_core.tokenizer import TOKENIZER_FILES
from opt_export.common import quiet

TARGETS = ("onnx", "saved-model", "tflite", "stablehlo")
METADATA_FILE = "export.json"
# (module, function) of each target's exporter, and the packages it needs.
EXPORTERS = {
    "onnx": ("opt_export.onnx", "export_onnx"),
    "saved-model": ("opt_export.saved_model", "export_saved_model"),
    "tflite": ("opt_export.saved_model", "export_tflite"),
    "stablehlo": ("opt_export.stablehlo", "export_stablehlo"),
}
FRAMEWORKS = {"onnx": "PyTorch", "saved-model": "Keras", "tflite": "Keras", "stablehlo": "Flax"}
REQUIRED_PACKAGES = {
    "onnx": ("torch", "onnx", "onnxscript"),
    "saved-model": ("tensorflow", "keras"),
    "tflite": ("tensorflow", "keras"),
    "stablehlo": ("jax", "flax"),
}
OPTIONS = {"onnx": ("opset",), "tflite": ("batch_size", "sequence_length")}
OPSETS = range(18, 24)  # the dynamo exporter's lowest to the highest ONNX Runtime 1.31 runs
# Files of the model folder an export carries, so that it is self-describing (the tokenizer's among them).
CARRIED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def export(model: str | os.PathLike, out: str | os.PathLike, to: str, **options: int) -> Path:
    """Exports the causal LM at `model` into the new folder `out` for the runtime of target `to`.

    Args:
        model: a model folder or hub id.
        out: the folder to create; an existing empty folder is filled, anything else is refused.
        to: one of TARGETS.
        **options: `opset` (onnx); `batch_size`, `sequence_length` (tflite's fixed shapes).

    Returns:
        `out`.

    Raises:
        ConfigError: a bad target, option, model or output folder, before any framework is imported.
    """
    folder, config = check_export(model, out, to, options)
    module, function = EXPORTERS[to]
    out = Path(out)
    with staging(out) as tmp:
        with quiet():  # the framework's import and export, whose logs would fill the terminal
            description = getattr(importlib.import_module(module), function)(folder, config, tmp, **options)
        for name in CARRIED_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        write_metadata(tmp, to, str(model), description)
    return out


def check_export(model, out, to: str, options: dict) -> tuple[Path, OPTConfig]:
    """Every argument checked, the model's folder resolved and its config read; nothing written, no framework."""
    if to not in TARGETS:
        raise ConfigError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    for name in options:
        if name not in OPTIONS.get(to, ()):
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to --to {to}")
    check_output_folder(Path(out))
    check_packages(to)
    folder = _resolved(model)
    config = OPTConfig.from_pretrained(folder)
    if is_quantized(config):
        raise ConfigError(f"{model} holds int8 weights; the exports take float weights: export the float model")
    _check_options(to, options, config)
    return folder, config


def check_output_folder(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty; name a new or empty folder")


def check_packages(to: str) -> None:
    missing = [name for name in REQUIRED_PACKAGES[to] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--to {to} needs {', '.join(missing)}, which is not installed: pip install 'opt-lm[all]'")


def _resolved(model) -> Path:
    try:
        return resolve_model(model, extra_files=CARRIED_FILES[1:])
    except OPTError as error:
        raise type(error)(f"model {model}: {error}") from None


def _check_options(to: str, options: dict, config: OPTConfig) -> None:
    opset = options.get("opset")
    if opset is not None and opset not in OPSETS:
        raise ConfigError(f"--opset must be in {OPSETS[0]}..{OPSETS[-1]}, got {opset}")
    length = options.get("sequence_length")
    if length is not None and not 1 <= length <= config.max_position_embeddings:
        raise ConfigError(
            f"--sequence-length must be in 1..{config.max_position_embeddings} (the model's "
            f"max_position_embeddings), got {length}"
        )
    batch = options.get("batch_size")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch}")


def write_metadata(folder: Path, to: str, source: str, description: dict) -> None:
    metadata = {"target": to, "framework": FRAMEWORKS[to], "source": source, "dtype": "float32", **description}
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    metadata["files"] = sorted([*files, METADATA_FILE])
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` to export into; renamed to `out` when the block succeeds, removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(stale_partials(out.parent, prefix=f".{out.name}."))
    suffix = f".{os.getpid()}{TEMPORARY_SUFFIX}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.exporting-", suffix=suffix, dir=out.parent))
    try:
        yield tmp
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Syncs every file, then one rename (onto `out` itself when it is an empty folder): the commit point."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_directory(tmp)
    try:
        os.replace(tmp, out)
    except OSError as error:  # `out` was filled (or made a file) while the export ran
        raise ConfigError(f"output {out} changed during the export and was left as it is ({error})") from None
    fsync_directory(out.parent)
