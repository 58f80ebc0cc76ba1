"""Checkpoints in canonical names: `load_checkpoint` reads any format and checks it against the parameter table,
`save_checkpoint` writes canonical tensors in any format as HF names them.

Below this module: `opt_core.formats` (the format registry: detection, shards, crash-safe commits, removing an
earlier save) and `opt_core.weights` (the parameter table and each format's naming style). Above it:
`opt_core.pretrained` (the framework-free halves of `from_pretrained` / `save_pretrained`) and `conversion`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from opt_core import quantization
from opt_core.config import OPTConfig
from opt_core.dtypes import FLOAT_DTYPES, to_numpy_dtype
from opt_core.errors import CheckpointError
from opt_core.formats import DEFAULT_MAX_SHARD_SIZE, get_format, read_checkpoint, write_tensors
from opt_core.lazy import LazyTensor, release_pages, row_blocks
from opt_core.weights import MatchResult, match_checkpoint, to_file_tensors


def load_checkpoint(path: str | os.PathLike, config: OPTConfig, head: str, fmt: str | None = None) -> MatchResult:
    """Canonical, torch-layout arrays of the model with `head` from a folder or file, checked against the table.

    Arrays keep the file's dtype and may be read-only memory-mapped views; cast or copy them as needed. When
    config.json has an int8 `quantization_config` (`opt_core.quantization`), the quantized weights are int8 and
    their float32 scales come as `{module}.weight_scale`, every one checked.
    """
    quantized = quantization.is_quantized(config)
    fmt, tensors = read_checkpoint(path, fmt)
    style = get_format(fmt).style
    if quantized and style != "torch":
        raise CheckpointError(f"{path}: int8 quantized weights are stored in safetensors, not in {fmt!r} files")
    tensors, scales = quantization.split_scales(tensors, quantized)
    match = match_checkpoint(tensors, config, head, style, source=str(path))
    match.tensors = quantization.check_quantized(match.tensors, scales, quantized, config, head, str(path))
    warn_non_finite(match.tensors, str(path))
    return match


_FLOATS = {np.dtype(dtype) for dtype in FLOAT_DTYPES.values()} | {np.dtype(np.float64)}


def warn_non_finite(tensors: Mapping[str, np.ndarray], source: str) -> list[str]:
    """Warns, naming each tensor, when weights hold NaN or infinity (the model would compute NaN from them, as a
    checkpoint saved after a diverged run does); the weights still load, as HF loads them. Returns the names.

    Each block of a memory-mapped file is released once checked (`opt_core.lazy.release_pages`): reading every
    weight must not leave the whole file resident in the process before the framework copies it."""
    bad = []
    for name, array in tensors.items():
        if np.dtype(array.dtype) in _FLOATS and not _all_finite(array):
            values = np.asarray(array)
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            bad.append(f"{name} ({nan} NaN, {inf} infinite of {values.size})")
            release_pages(array)
    if bad:
        warnings.warn(f"{source}: weights that are not finite: {'; '.join(bad)}", stacklevel=3)
    return bad


def _all_finite(array: np.ndarray) -> bool:
    if array.ndim == 0:
        return bool(np.isfinite(array))
    # A block at a time: the check never allocates a tensor-sized mask, and each block is released once checked.
    return all(np.isfinite(block).all() for _, block in row_blocks(array))


def save_checkpoint(
    canonical: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    config: OPTConfig,
    head: str,
    fmt: str = "safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | np.dtype | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> list[Path]:
    """Writes canonical tensors as HF names them in `fmt`, sharded above `max_shard_size`; returns the files.

    Args:
        canonical: {canonical name: array or LazyTensor}, torch layout.
        folder: the folder; an earlier save's weights in it are replaced (`opt_core.formats.write_tensors`).
        config, head: the model, for the names.
        fmt: a key of `opt_core.formats.FORMATS`.
        max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
        dtype: cast every tensor to this dtype on the way out, one tensor at a time.
        extra_files: {file name: bytes or text} committed with the weights (`opt_core.formats.write_tensors`).

    int8 quantized tensors (`canonical` holding `{module}.weight_scale` scales, `opt_core.quantization`) are
    written to safetensors only, each scale after its weight, and `dtype` casts only the float tensors that
    stayed float.
    """
    style = get_format(fmt).style
    tensors = to_file_tensors(canonical, config, head, style)
    target = to_numpy_dtype(dtype) if dtype is not None else None
    if quantization.has_scales(canonical):
        if fmt != "safetensors":
            raise ValueError(f"int8 quantized weights are saved in safetensors only, not {fmt!r}")
        tensors = _with_scales(tensors, canonical, target)
        target = None
    return write_tensors(
        tensors, folder, fmt, head=head, max_shard_size=max_shard_size, dtype=target, extra_files=extra_files
    )


def _with_scales(tensors: dict, canonical: Mapping[str, np.ndarray], dtype: np.dtype | None) -> dict:
    """File tensors with each int8 weight's scale after it (same prefix as the weight); float tensors cast to
    `dtype` one at a time on the way out, int8 weights and float32 scales never."""
    out = {}
    for name, array in tensors.items():
        canonical_name = name if name in canonical else "model." + name  # a base model's `decoder.*` names
        scale = canonical.get(quantization.scale_name(canonical_name))
        if dtype is not None and scale is None and np.dtype(array.dtype) != dtype:
            array = LazyTensor.wrap(array, name).astype(dtype)
        out[name] = array
        if scale is not None:
            out[quantization.scale_name(name)] = quantization.file_scale(scale)
    return out
