"""safetensors files: a memory-mapped reader (bfloat16 through ml_dtypes) and a streaming writer, without the
`safetensors` package, so reading never copies a tensor and writing never holds the model twice.

Siblings: `torch_pickle`, `keras_h5`, `flax_msgpack`, each one format of the registry in `opt_core.formats`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from opt_core.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: read-only array view into the memory-mapped file}. Checks the header against the file's size."""
    path = Path(path)
    size = _file_size(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: its header claims {header_len} bytes, over the 100 MB limit")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes "
                f"but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested too deep
            raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {name: _safetensors_view(path, name, info, data, data_start, size) for name, info in header.items()}
    _check_tiling(path, header, size - data_start)
    return tensors


def _check_tiling(path: Path, header: dict, data_bytes: int) -> None:
    """As the reference reader: the tensors' byte ranges tile the data section exactly, in order of offset, so no
    two tensors share bytes and no bytes are left over."""
    ranges = sorted((tuple(info["data_offsets"]), name) for name, info in header.items())
    expected = 0
    for (begin, end), name in ranges:
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} at bytes {begin}..{end} {what}")
        expected = end
    if expected != data_bytes:
        raise CheckpointError(f"{path}: its tensors cover {expected} bytes of a {data_bytes}-byte data section")


def _whole(value) -> int:
    """A non-negative int from the header (JSON floats, bools and negatives are malformed)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def _safetensors_view(path, name, info, data, data_start, size) -> np.ndarray:
    try:
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(_whole(d) for d in info["shape"])
        begin, end = (_whole(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        shown = repr(info)[:200]
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {shown}") from None
    if begin > end:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] that end before they begin")
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}"
        )
    if end - begin != math.prod(shape) * dtype.itemsize:  # Python ints: a huge shape cannot wrap around
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
    return data[data_start + begin : data_start + end].view(dtype).reshape(shape)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a safetensors file with HF's `{"format": "pt"}` metadata, streaming one tensor at a time.

    Writes `path` directly: `opt_core.formats` gives it a temporary name and renames it once complete.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    for name, array in tensors.items():
        if np.dtype(array.dtype) not in names:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        nbytes = array.size * array.dtype.itemsize
        header[name] = {
            "dtype": names[np.dtype(array.dtype)],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
