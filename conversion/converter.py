"""Any OPT checkpoint to any other: `convert(src, dst, to=...)` and the `add_arguments`/`run` pair of the CLI.

A conversion opens the source as canonical lazy tensors (HF formats through `conversion.formats`, metaseq originals
through `conversion.metaseq`), casts them lazily to the asked dtype, writes the destination format into a temporary
folder beside `dst` (or, replacing a folder, inside it), re-reads it and checks every tensor's name, shape, dtype and
bits against the source, and only then puts it in place in one commit (a rename, or a journaled commit of its files
into the existing folder). Any failure removes the temporary folder and leaves `dst` as it was; a process killed at
any moment leaves the previous `dst` or the new one, never a mix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from conversion import formats, metaseq
from opt_core.config import CONFIG_NAME, PRESETS, OPTConfig
from opt_core.dtypes import FLOAT_DTYPES, to_numpy_dtype
from opt_core.errors import CheckpointError, ConfigError, OPTError
from opt_core.files import (
    TEMPORARY_SUFFIX,
    FolderCommit,
    complete_interrupted_save,
    fsync_directory,
    fsync_file,
    is_temporary_name,
    parse_size,
    remove_partials,
    stale_partials,
)
from opt_core.formats import DEFAULT_MAX_SHARD_SIZE, FORMATS, detect_format, get_format, storable_tensors
from opt_core.hub import resolve_model
from opt_core.lazy import LazyTensor
from opt_core.tokenizer import TOKENIZER_FILES
from opt_core.weights import match_checkpoint

SOURCE_FORMATS = (*FORMATS, "metaseq")
DTYPES = tuple(FLOAT_DTYPES)
# Files beside the weights that a converted folder keeps (config.json is written separately: its dtype may change).
CARRIED_FILES = ("generation_config.json", *TOKENIZER_FILES)


class ConversionError(OPTError):
    """A conversion cannot start (bad destination or arguments); nothing was written."""


@dataclasses.dataclass
class Source:
    """An opened checkpoint: canonical lazy tensors (torch layout, stored dtype) and what describes them.

    Args:
        path: what the user named.
        fmt: one of SOURCE_FORMATS.
        config: the model's configuration.
        config_file: the config.json it came from, copied verbatim when the conversion does not change it.
        head: one of `opt_core.weights.HEADS`.
        tensors: canonical name -> lazy tensor.
        folder: where carried files (tokenizer, generation config) are looked for.
    """

    path: Path
    fmt: str
    config: OPTConfig
    config_file: Path | None
    head: str
    tensors: dict[str, LazyTensor]
    folder: Path


@dataclasses.dataclass
class ConversionResult:
    """What `convert` wrote: the folder, its format, head, weight files, dtypes and number of tensors."""

    dst: Path
    fmt: str
    head: str
    files: list[str]
    dtypes: list[str]
    num_tensors: int
    source_format: str


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    config: str | os.PathLike | None = None,
    from_format: str | None = None,
    force: bool = False,
) -> ConversionResult:
    """Converts the OPT checkpoint at `src` into a folder `dst` in format `to`.

    Args:
        src: a checkpoint folder, weights file or shard index, or a metaseq folder / `.pt` file / model part.
        dst: the folder to create; refused if it exists, unless `force`.
        to: "safetensors", "pytorch", "tf" or "flax".
        dtype: "float32", "float16" or "bfloat16"; None keeps each tensor's stored dtype.
        max_shard_size: shard the weights above this size ("2GB", "500MB" or bytes), as HF's save_pretrained.
        config: a config.json, a folder holding one, or a preset name ("opt-125m"); default: the source's
            config.json, or for metaseq its cfg and tensor shapes.
        from_format: read this format (one of SOURCE_FORMATS) when `src` holds several or its name is unclear.
        force: replace an existing `dst`.

    Returns:
        A ConversionResult describing what was written.

    Raises:
        ConversionError, CheckpointError, ConfigError: with a message naming the file or argument at fault;
            `dst` is then untouched and no temporary folder is left.
    """
    size = _check_arguments(to, dtype, max_shard_size, from_format)
    src, dst = _local_source(src, from_format), Path(dst)
    _check_destination(src, dst, force)
    source = open_source(src, from_format, config)
    tensors = _cast(source.tensors, dtype, to)
    out_config = _output_config(source, tensors, dtype)
    with _staging(dst, force) as tmp:
        files = formats.write_weights(tensors, tmp, out_config, source.head, to, size)
        _write_config(source, out_config, tmp)
        _carry_files(source.folder, tmp)
        formats.verify_weights(tmp, to, tensors, out_config, source.head)
    dtypes = sorted({t.dtype.name for t in tensors.values()})
    return ConversionResult(dst, to, source.head, files, dtypes, len(tensors), source.fmt)


def _local_source(src: str | os.PathLike, from_format: str | None) -> Path:
    """`src` itself when it exists; else a hub id, fetched (weights of one format, config, tokenizer files)."""
    if Path(src).exists():
        return Path(src)
    formats_wanted = (from_format,) if from_format in FORMATS else None
    return resolve_model(str(src), formats=formats_wanted, extra_files=CARRIED_FILES)


def _check_arguments(to: str, dtype: str | None, max_shard_size: int | str, from_format: str | None) -> int:
    if to not in FORMATS:
        raise ConversionError(f"cannot convert to {to!r}; choose one of {', '.join(FORMATS)}")
    if from_format is not None and from_format not in SOURCE_FORMATS:
        raise ConversionError(f"cannot read format {from_format!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if to == "tf" and dtype == "bfloat16":
        raise ConversionError(
            "tf_model.h5 cannot hold bfloat16 (HDF5 has no such type; HF's TF port stores float32 or float16): "
            "pass --dtype float16 or float32, or convert to safetensors, pytorch or flax"
        )
    try:
        size = parse_size(max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size: {error}") from None
    if size <= 0:
        raise ConversionError(f"--max-shard-size must be positive, got {max_shard_size!r}")
    return size


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    if not src.exists():
        raise CheckpointError(f"no checkpoint at {src}: not a file or folder")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConversionError(f"{dst} already exists; pass --force (force=True) to replace it")
        # Replacing dst removes it; that must not take the source with it.
        real_src, real_dst = src.resolve(), dst.resolve()
        if real_src == real_dst or real_dst in real_src.parents:
            raise ConversionError(f"{dst} holds the source {src}; write the conversion somewhere else")


# ----- opening the source


def open_source(src: Path, from_format: str | None, config_value: str | os.PathLike | None) -> Source:
    """The checkpoint at `src` as canonical lazy tensors, with its config and head.

    Args:
        src: a folder, weights file, shard index, or metaseq checkpoint.
        from_format: force a format (one of SOURCE_FORMATS); None detects it.
        config_value: as `convert`'s `config`.
    """
    folder = src if src.is_dir() else src.parent
    config, config_file = resolve_config(config_value, folder) if config_value is not None else (None, None)
    if from_format == "metaseq" or (from_format is None and _is_metaseq(src)):
        found_config, tensors, files = metaseq.load_metaseq(src, config)
        match = match_checkpoint(tensors, found_config, "causal_lm", "torch", source=str(src))
        return Source(src, "metaseq", found_config, config_file, "causal_lm", match.tensors, files[0].parent)
    fmt, file, file_tensors = formats.read_tensors(src, from_format)
    folder = file.parent
    if config is None:
        config, config_file = resolve_config(None, folder)
    style = get_format(fmt).style
    head = formats.detect_head(list(file_tensors), style, config)
    match = match_checkpoint(file_tensors, config, head, style, source=str(src))
    tensors = {name: LazyTensor.wrap(array, name) for name, array in match.tensors.items()}
    return Source(src, fmt, config, config_file, head, tensors, folder)


def _is_metaseq(src: Path) -> bool:
    """metaseq when `src` is a `.pt` file in metaseq's layout, or a folder with metaseq files and no HF weights."""
    if src.is_dir():
        try:
            detect_format(src)
            return False  # HF weights in a folder win over metaseq files beside them
        except CheckpointError:
            pass
    return metaseq.looks_like_metaseq(src)


def resolve_config(value: str | os.PathLike | None, folder: Path) -> tuple[OPTConfig, Path | None]:
    """(config, the config.json it was read from) for `--config` VALUE, or (value None) the folder's config.json.

    Args:
        value: a config.json file, a folder holding one, or a preset name such as "opt-125m"; None reads
            `folder`/config.json.
        folder: the source's folder.
    """
    presets = ", ".join(PRESETS)
    if value is None:
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(
                f"no {CONFIG_NAME} in {folder}; pass --config with a config.json, a folder holding one, "
                f"or a preset ({presets})"
            )
        return OPTConfig.from_json_file(path), path
    path = Path(value)
    if path.is_dir():
        path = path / CONFIG_NAME
    if path.is_file():
        return OPTConfig.from_json_file(path), path
    if str(value).split("/")[-1].lower() in PRESETS:
        return OPTConfig.from_preset(str(value)), None
    raise ConfigError(f"--config {value!s}: not a config.json, a folder holding one, or a preset ({presets})")


# ----- writing


def _cast(tensors: dict[str, LazyTensor], dtype: str | None, fmt: str) -> dict[str, LazyTensor]:
    """The tensors in the written dtype: `dtype`, or each one's own; tf_model.h5 widens bfloat16 to float32."""
    return storable_tensors(tensors, fmt, to_numpy_dtype(dtype) if dtype else None)


def _output_config(source: Source, tensors: dict[str, LazyTensor], dtype: str | None) -> OPTConfig:
    """The source's config, with its dtype set to the written one when that is uniform and differs."""
    written = {t.dtype.name for t in tensors.values()}
    name = written.pop() if len(written) == 1 else None
    config = source.config
    keeps_unset = config.dtype is None and dtype is None and source.config_file is not None
    if name is not None and config.dtype != name and not keeps_unset:
        config = config.replace(dtype=name)
    return config


def _write_config(source: Source, config: OPTConfig, folder: Path) -> None:
    if source.config_file is not None and config is source.config:
        shutil.copyfile(source.config_file, folder / CONFIG_NAME)  # unchanged: byte for byte
    else:
        config.save_pretrained(folder)
    OPTConfig.from_json_file(folder / CONFIG_NAME)  # reads back (raises ConfigError otherwise)


def _carry_files(src_folder: Path, folder: Path) -> None:
    for name in CARRIED_FILES:
        if (src_folder / name).is_file():
            shutil.copyfile(src_folder / name, folder / name)


@contextlib.contextmanager
def _staging(dst: Path, force: bool) -> Iterator[Path]:
    """A temporary folder to convert into, put in place as `dst` when the block succeeds, removed whatever happens.

    It sits beside `dst`, and one rename makes it `dst`; or, replacing an existing folder (`force`), inside it,
    and the new files replace the folder's content in one journaled commit (`opt_core.files.FolderCommit`), which
    also works where `dst` is a mount point. Either way a process killed at any moment leaves the previous `dst`
    or the new one, never a mix; staging folders of killed conversions are removed by the next one (and, inside
    `dst`, by loading it).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dst)
    into = dst if force and dst.is_dir() and not dst.is_symlink() else dst.parent
    prefix = ".converting-" if into == dst else f".{dst.name}.converting-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=f".{os.getpid()}{TEMPORARY_SUFFIX}", dir=into))
    try:
        yield tmp
        _move_into_place(tmp, dst, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_staging(dst: Path) -> None:
    """Staging folders (and a journaled commit) that conversions killed midway left in or beside `dst`."""
    if dst.is_dir():
        complete_interrupted_save(dst)
    remove_partials(stale_partials(dst.parent, prefix=f".{dst.name}."))


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    for file in tmp.iterdir():
        fsync_file(file)  # the data is on disk before any name points at it
    fsync_directory(tmp)
    if dst.is_dir() and not dst.is_symlink() and force:
        _replace_content(tmp, dst)
        return
    if not (dst.exists() or dst.is_symlink()):
        os.replace(tmp, dst)  # the commit point: one rename
        fsync_directory(dst.parent)
        return
    if not force:  # it appeared while we were converting
        raise ConversionError(f"{dst} already exists; pass --force (force=True) to replace it")
    # dst is a file or a symlink (not a checkpoint folder): moved aside, then replaced by the new folder. A crash
    # between the two renames leaves no dst, and the old one in the `.replaced-` folder beside it.
    old = Path(
        tempfile.mkdtemp(prefix=f".{dst.name}.replaced-", suffix=f".{os.getpid()}{TEMPORARY_SUFFIX}", dir=dst.parent)
    )
    try:
        os.replace(dst, old / "old")
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old / "old", dst)  # put the previous destination back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _replace_content(tmp: Path, dst: Path) -> None:
    """Replaces everything in the folder `dst` by the files of `tmp`, in one journaled commit."""
    names = sorted(os.listdir(tmp))
    with FolderCommit(dst) as commit:
        for name in names:
            os.replace(tmp / name, commit.path(name))
        keep = {*names, tmp.name}
        commit.commit(removals=lambda: [n for n in os.listdir(dst) if n not in keep and not is_temporary_name(n)])


# ----- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the conversion's arguments to `parser` (`python -m conversion` and `opt-lm convert` share them).

    Args:
        parser: an argparse parser or subparser.
    """
    parser.add_argument("src", help="checkpoint folder, weights file, shard index, or metaseq folder / .pt file")
    parser.add_argument("dst", help="folder to create")
    parser.add_argument("--to", required=True, choices=FORMATS, help="format to write")
    parser.add_argument("--from", dest="from_format", choices=SOURCE_FORMATS, help="format to read (default: detect)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast every tensor (default: keep the stored dtypes)")
    size = DEFAULT_MAX_SHARD_SIZE
    parser.add_argument("--max-shard-size", default=size, help=f"shard the weights above this size (default {size})")
    parser.add_argument("--config", help="config.json, a folder holding one, or a preset such as opt-125m")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs a conversion from parsed `add_arguments` arguments; prints a summary or the error. Returns the exit code.

    Args:
        args: the parsed arguments.
    """
    try:
        result = convert(
            args.src,
            args.dst,
            args.to,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            config=args.config,
            from_format=args.from_format,
            force=args.force,
        )
    except (OPTError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    total = sum((result.dst / name).stat().st_size for name in result.files)
    print(
        f"{args.src} ({result.source_format}) -> {result.dst} ({result.fmt}, {result.head}, "
        f"{'/'.join(result.dtypes)}): {result.num_tensors} tensors in {len(result.files)} file(s), "
        f"{total / 1e6:.1f} MB; verified"
    )
    return 0
