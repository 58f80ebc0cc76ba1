"""The framework-free halves of `from_pretrained` and `save_pretrained`, shared by the three framework packages.

`load_pretrained` resolves a folder or hub id, reads config.json (with HF's keyword overrides), reads and checks the
checkpoint against the parameter table, draws HF's fresh initialisation for a task head the checkpoint lacks, and
reads generation_config.json. Each framework then only turns canonical numpy arrays into its own tensors.

`save_pretrained` writes config.json (with the saved dtype and HF's class name), generation_config.json and the
weights in any format (`opt_core.checkpoint.save_checkpoint`: one crash-safe commit that also removes an earlier
save's weights).

Siblings: `opt_torch/pretrained.py`, `opt_tf/pretrained.py`, `opt_flax/pretrained.py`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.checkpoint import load_checkpoint, save_checkpoint
from opt_core.config import CONFIG_NAME, OPTConfig
from opt_core.dtypes import check_dtype, dtype_name
from opt_core.errors import ConfigError
from opt_core.files import complete_interrupted_save
from opt_core.formats import DEFAULT_MAX_SHARD_SIZE, get_format
from opt_core.generation import GENERATION_CONFIG_NAME, GenerationConfig, load_generation_config
from opt_core.hub import resolve_model
from opt_core.quantization import dequantize_state, has_scales, with_quantization_config
from opt_core.weights import fresh_parameter

EMBED_TOKENS = "model.decoder.embed_tokens.weight"
# config.json keys HF accepts as keyword overrides besides the fields OPTConfig models.
_OVERRIDABLE_KEYS = {"label2id", "torch_dtype", "architectures"}


@dataclasses.dataclass
class Loaded:
    """What `load_pretrained` read, ready for a framework to build its model from.

    Args:
        folder: the local folder the files came from.
        config: the model's config, overrides applied.
        tensors: {canonical name: array} in torch layout and the stored dtype (possibly read-only
            memory-mapped views), fresh task-head parameters included.
        stored_dtype: the dtype the checkpoint stores (of the token embedding), for dtype="auto".
        generation_config: generation_config.json, or the config's special ids.
    """

    folder: Path
    config: OPTConfig
    tensors: dict[str, np.ndarray]
    stored_dtype: np.dtype
    generation_config: GenerationConfig


# Options of one framework's from_pretrained that reach the shared code only from another framework's.
_OTHER_FRAMEWORKS_OPTIONS = {
    "tp_plan": "tensor parallelism is opt_torch's (from_pretrained(..., tp_plan='auto') under torchrun); "
    "Flax shards with mesh=",
    "device_map": "placement over devices and the disk is opt_torch's (accelerate's device_map); Keras places "
    "weights with tf.distribute strategies, Flax with mesh=",
}


class UnknownArgumentError(ConfigError, TypeError):
    """A keyword that is neither an option nor a config field: a ConfigError, as every refusal of this library,
    and a TypeError, as Python answers an unexpected keyword."""


def check_overrides(config_overrides: Mapping[str, Any], method: str) -> None:
    """Refuses a keyword that is neither an option of `method` nor a config field (HF would silently keep it as a
    config attribute and load as if it were not given), naming each."""
    fields = {f.name for f in dataclasses.fields(OPTConfig)} - {"extra"}
    unknown = sorted(set(config_overrides) - fields - _OVERRIDABLE_KEYS)
    if unknown:
        hints = "".join(
            f"; {name}: {_OTHER_FRAMEWORKS_OPTIONS[name]}" for name in unknown if name in _OTHER_FRAMEWORKS_OPTIONS
        )
        raise UnknownArgumentError(
            f"{method}() got arguments that are neither its options nor config fields: {', '.join(unknown)}{hints}"
        )


def load_pretrained(
    name_or_path: str | os.PathLike,
    head: str,
    *,
    seed: int | Callable[[], int] | None = 0,
    config: OPTConfig | None = None,
    fmt: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    keep_int8: bool = False,
    **config_overrides: Any,
) -> Loaded:
    """Reads everything a model of `head` needs from a local folder, the HF cache, or the hub.

    Every framework's `from_pretrained` passes its loading options through here; these are the ones they share.

    Args:
        name_or_path: a folder written by `save_pretrained` (any framework, or HF), or a hub id.
        head: "base", "causal_lm", "sequence_classification" or "question_answering".
        seed: seeds the fresh initialisation of a task head the checkpoint lacks (None: unseeded); a function is
            called for the seed only then, so a framework can draw it from its own random state without using it
            up on every load.
        config: use this config instead of the folder's config.json.
        fmt: read this checkpoint format ("safetensors", "pytorch", "tf", "flax") when the folder holds several.
        revision, cache_dir, local_files_only, token: passed to huggingface_hub for hub ids.
        keep_int8: the caller computes with int8 weights (opt_torch). Otherwise an int8 checkpoint
            (`opt_core.quantization`) is dequantized here, weight by weight, to the stored float dtype, and the
            config loses its `quantization_config`: the model computes in float with the dequantized weights, as
            HF transformers does with such a folder.
        **config_overrides: config fields to override, as HF's keyword overrides (e.g. `num_labels=3`); a keyword
            that is no config field raises `UnknownArgumentError` (a ConfigError and a TypeError), naming it.
    """
    overrides = dict(config_overrides)
    check_overrides(overrides, "from_pretrained")
    folder = resolve_model(
        name_or_path,
        formats=(get_format(fmt).name,) if fmt else None,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    complete_interrupted_save(folder)  # a save killed after its commit point is finished before config.json is read
    if config is None:
        config = OPTConfig.from_pretrained(folder, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    match = load_checkpoint(folder, config, head, fmt=fmt)
    tensors = dict(match.tensors)
    if match.missing_head_params:  # a task head the checkpoint lacks starts fresh, as HF's does
        rng = np.random.default_rng(seed() if callable(seed) else seed)
        for spec in match.missing_head_params:
            tensors[spec.name] = fresh_parameter(spec, config, rng)
    stored = np.dtype(match.tensors[EMBED_TOKENS].dtype)
    if not keep_int8 and has_scales(tensors):
        tensors = dequantize_state(tensors, stored)
        config = with_quantization_config(config, False)
    return Loaded(folder, config, tensors, stored, load_generation_config(folder, config))


def save_format(safe_serialization: bool | None, fmt: str | None, native: str, safe_by_default: bool) -> str:
    """The format `save_pretrained` writes, with HF's meaning of `safe_serialization` in each framework.

    Args:
        safe_serialization: True writes safetensors, False the framework's own format; None its default.
        fmt: any registry format, named explicitly; when safe_serialization is given too, they must agree.
        native: the framework's own non-safetensors format ("pytorch", "tf" or "flax").
        safe_by_default: HF PyTorch saves safetensors by default; HF's TF and Flax ports their own format.
    """
    if fmt is not None:
        fmt = get_format(fmt).name
        if safe_serialization is not None and safe_serialization != (fmt == "safetensors"):
            raise ValueError(f"safe_serialization={safe_serialization} contradicts fmt={fmt!r}; pass one of them")
        return fmt
    safe = safe_by_default if safe_serialization is None else safe_serialization
    return "safetensors" if safe else native


def save_pretrained(
    folder: str | os.PathLike,
    canonical: Mapping[str, np.ndarray],
    config: OPTConfig,
    head: str,
    *,
    architecture: str,
    generation_config: GenerationConfig | None,
    fmt: str,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: Any = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> list[Path]:
    """Writes config.json, generation_config.json and the weights as HF does, in one crash-safe commit; returns
    the weight files.

    Args:
        folder: created if needed.
        canonical: {canonical name: array or LazyTensor}, torch layout (a tied head once).
        config, head: the model.
        architecture: HF's PyTorch class name for config.json's `architectures`, which every framework reads.
        generation_config: written when given.
        fmt: a registry format (see `save_format`).
        max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
        dtype: cast the weights on the way out, one tensor at a time (default: as they are).
        extra_files: more {file name: bytes or text} committed with them (a trainer's optimizer state, the
            tokenizer's files), so that a crash never mixes them with another save's.

    int8 quantized weights (`canonical` holding their scales, `opt_core.quantization`) are written with the
    `quantization_config` in config.json, in compressed-tensors' layout, which HF transformers also reads.
    """
    saved = check_dtype(dtype) if dtype is not None else dtype_name(canonical[EMBED_TOKENS].dtype)
    config = with_quantization_config(config.replace(dtype=saved), has_scales(canonical))
    config.extra["architectures"] = [architecture]
    files: dict[str, bytes | str] = {CONFIG_NAME: config.to_json_string()}
    if generation_config is not None:
        files[GENERATION_CONFIG_NAME] = generation_config.to_json_string()
    clashes = sorted(set(files) & set(extra_files or {}))
    if clashes:
        raise ValueError(f"extra_files may not replace {', '.join(clashes)}: save_pretrained writes them")
    files.update(extra_files or {})
    # The configs are committed with the weights: a save that fails or is killed leaves the folder as it was.
    return save_checkpoint(
        canonical, folder, config, head, fmt=fmt, max_shard_size=max_shard_size, dtype=dtype, extra_files=files
    )
