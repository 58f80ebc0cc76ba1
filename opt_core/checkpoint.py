"""Checkpoint files to and from `{name: numpy array}`, for every format OPT ships in, without any framework.

| format        | single file           | sharded                                                        | names   |
|---------------|-----------------------|----------------------------------------------------------------|---------|
| "safetensors" | model.safetensors     | model-00001-of-0000N.safetensors + model.safetensors.index.json | torch   |
| "pytorch"     | pytorch_model.bin     | pytorch_model-00001-of-0000N.bin + pytorch_model.bin.index.json | torch   |
| "tf"          | tf_model.h5           | tf_model-00001-of-0000N.h5 + tf_model.h5.index.json              | keras   |
| "flax"        | flax_model.msgpack    | flax_model-00001-of-0000N.msgpack + flax_model.msgpack.index.json | flax  |

Safetensors files are memory-mapped: arrays are views into the file, so loading a model does not hold a second
copy of it. `.bin` files are read through `torch_pickle`'s restricted unpickler (no pickled code runs), `.h5`
through `keras_h5` and `.msgpack` through `flax_msgpack`.

`load_checkpoint` reads a folder or file and checks it against the parameter table (`weights.match_checkpoint`);
`save_checkpoint` writes canonical tensors in any format, sharded above `max_shard_size`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError
from opt_core.lazy import LazyTensor
from opt_core.weights import MatchResult, match_checkpoint, to_file_tensors

FORMATS = ("safetensors", "pytorch", "tf", "flax")
# A folder holding several formats is read in this order unless the caller names one.
READ_ORDER = ("safetensors", "pytorch", "flax", "tf")
WEIGHTS_NAME = {
    "safetensors": "model.safetensors",
    "pytorch": "pytorch_model.bin",
    "tf": "tf_model.h5",
    "flax": "flax_model.msgpack",
}
STYLE = {"safetensors": "torch", "pytorch": "torch", "tf": "keras", "flax": "flax"}
DEFAULT_MAX_SHARD_SIZE = "5GB"

# ----- safetensors (own reader: memory-mapped, bfloat16 through ml_dtypes)

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
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes "
                f"but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    return {name: _safetensors_view(path, name, info, data, data_start, size) for name, info in header.items()}


def _safetensors_view(path, name, info, data, data_start, size) -> np.ndarray:
    try:
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}"
        )
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
    return data[data_start + begin : data_start + end].view(dtype).reshape(shape)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a safetensors file with HF's `{"format": "pt"}` metadata, streaming one tensor at a time."""
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


# ----- one file of any format -> {file name: array}


def read_file(path: str | os.PathLike, fmt: str) -> dict[str, np.ndarray]:
    """Every tensor of one checkpoint file, under the names the file uses."""
    path = Path(path)
    if fmt == "safetensors":
        return read_safetensors(path)
    if fmt == "pytorch":
        from opt_core.torch_pickle import load_state_dict

        return load_state_dict(path)
    if fmt == "tf":
        from opt_core.keras_h5 import read_h5

        return read_h5(path)
    if fmt == "flax":
        from opt_core.flax_msgpack import flatten, read_msgpack

        return flatten(read_msgpack(path))
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


def write_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, fmt: str) -> None:
    """Writes one checkpoint file (names already in the format's style)."""
    if fmt == "safetensors":
        write_safetensors(tensors, path)
    elif fmt == "pytorch":
        from opt_core.torch_pickle import save_state_dict

        save_state_dict(dict(tensors), path)
    elif fmt == "tf":
        from opt_core.keras_h5 import write_h5

        # HDF5 has no bfloat16: such weights are stored as float32, which holds every bfloat16 value exactly.
        tensors = {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in tensors.items()}
        write_h5(tensors, path, instance_name=KERAS_INSTANCE_NAMES["causal_lm"])
    elif fmt == "flax":
        from opt_core.flax_msgpack import unflatten, write_msgpack

        write_msgpack(unflatten(dict(tensors)), path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")


# ----- folders: format detection, shards


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> tuple[str, Path]:
    """(format, file or index path) of the checkpoint in a folder or file; `fmt` forces a format."""
    path = Path(path)
    if path.is_file():
        return _format_of_file(path, fmt), path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: not a file or folder")
    for candidate in (fmt,) if fmt else READ_ORDER:
        if candidate not in FORMATS:
            raise ValueError(f"unknown checkpoint format {candidate!r}; expected one of {FORMATS}")
        for name in (WEIGHTS_NAME[candidate], WEIGHTS_NAME[candidate] + ".index.json"):
            if (path / name).is_file():
                return candidate, path / name
    wanted = [WEIGHTS_NAME[f] for f in ((fmt,) if fmt else READ_ORDER)]
    raise CheckpointError(f"no checkpoint in {path}: looked for {', '.join(wanted)} (or their .index.json)")


def _format_of_file(path: Path, fmt: str | None) -> str:
    name = path.name.removesuffix(".index.json")
    suffixes = {
        ".safetensors": "safetensors",
        ".bin": "pytorch",
        ".pt": "pytorch",
        ".h5": "tf",
        ".msgpack": "flax",
    }
    found = suffixes.get(Path(name).suffix)
    if fmt:
        return fmt
    if found is None:
        raise CheckpointError(f"cannot tell the checkpoint format of {path} from its name")
    return found


def read_checkpoint(path: str | os.PathLike, fmt: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """(format, {file name: array}) of a folder, single file, or shard index."""
    fmt, file = detect_format(path, fmt)
    if not file.name.endswith(".index.json"):
        return fmt, read_file(file, fmt)
    if fmt == "tf":  # HF's TF shards are laid out unlike its single file; keras_h5 knows how
        from opt_core.keras_h5 import read_h5_sharded

        return fmt, read_h5_sharded(file)
    if fmt == "flax":
        from opt_core.flax_msgpack import flatten, read_msgpack_sharded

        return fmt, flatten(read_msgpack_sharded(file))
    weight_map = _read_index(file)
    tensors: dict[str, np.ndarray] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_tensors = read_file(file.parent / shard, fmt)
        tensors.update({k: v for k, v in shard_tensors.items() if weight_map.get(k) == shard})
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise CheckpointError(f"{file} lists tensors its shards do not hold: {', '.join(absent[:10])}")
    return fmt, tensors


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a shard index: expected JSON with a 'weight_map'") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard files")
    return weight_map


def load_checkpoint(path: str | os.PathLike, config: OPTConfig, head: str, fmt: str | None = None) -> MatchResult:
    """Canonical, torch-layout arrays of the model with `head` from a folder or file, checked against the table.

    Arrays keep the file's dtype and may be read-only memory-mapped views; cast or copy them as needed.
    """
    fmt, tensors = read_checkpoint(path, fmt)
    return match_checkpoint(tensors, config, head, STYLE[fmt], source=str(path))


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" (10**9), "5GiB" (2**30), "200MB", "100KB", or an int, as HF's max_shard_size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {size!r}; write it like '5GB', '500MB' or a byte count")
    units = {
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(match.group(1)) * units.get((match.group(2) or "B").upper(), 1))


def shard(tensors: Mapping[str, np.ndarray], max_shard_size: int) -> list[dict[str, np.ndarray]]:
    """Splits tensors, in order, into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    current = 0
    for name, array in tensors.items():
        nbytes = array.size * array.dtype.itemsize
        if shards[-1] and current + nbytes > max_shard_size:
            shards.append({})
            current = 0
        shards[-1][name] = array
        current += nbytes
    return shards


def save_checkpoint(
    canonical: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    config: OPTConfig,
    head: str,
    fmt: str = "safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: str | np.dtype | None = None,
) -> list[Path]:
    """Writes canonical tensors as HF names them in `fmt`, sharded above `max_shard_size`; returns the files."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_file_tensors(canonical, config, head, STYLE[fmt])
    if dtype is not None:
        # Cast lazily: each tensor is converted while it is written, never the whole model at once.
        target = to_numpy_dtype(dtype)
        tensors = {k: LazyTensor.wrap(v, k).astype(target) for k, v in tensors.items()}
    if fmt in ("tf", "flax"):
        return _save_tf_or_flax(tensors, folder, fmt, head, parse_size(max_shard_size))
    shards = shard(tensors, parse_size(max_shard_size))
    base = WEIGHTS_NAME[fmt]
    if len(shards) == 1:
        write_file(shards[0], folder / base, fmt)
        return [folder / base]
    stem, suffix = base.rsplit(".", 1)
    files, weight_map = [], {}
    for i, part in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
        write_file(part, folder / name, fmt)
        files.append(folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(a.size * a.dtype.itemsize for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path = folder / f"{base}.index.json"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [*files, index_path]


def _save_tf_or_flax(tensors, folder: Path, fmt: str, head: str, max_shard_size: int) -> list[Path]:
    """HF's TF and Flax sharding differ from the torch formats' (layout, index keys): their modules do it."""
    if fmt == "tf":
        from opt_core.keras_h5 import write_h5_sharded

        # HDF5 has no bfloat16: such weights are stored as float32, which holds every bfloat16 value exactly.
        bf16 = np.dtype(ml_dtypes.bfloat16)
        tensors = {k: LazyTensor.wrap(v, k).astype(np.float32) if v.dtype == bf16 else v for k, v in tensors.items()}
        names = write_h5_sharded(tensors, folder, KERAS_INSTANCE_NAMES[head], max_shard_size)
    else:
        from opt_core.flax_msgpack import unflatten, write_msgpack_sharded

        names = write_msgpack_sharded(unflatten(dict(tensors)), folder, max_shard_size)
    return [folder / name for name in names]


# The instance names HF's TF port gives its models (ignored on read; kept so files look like HF's).
KERAS_INSTANCE_NAMES = {
    "base": "tfopt_model",
    "causal_lm": "tfopt_for_causal_lm",
    "sequence_classification": "tfopt_for_sequence_classification",
    "question_answering": "tfopt_for_question_answering",
}

_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
}


def to_numpy_dtype(dtype: str | np.dtype) -> np.dtype:
    """numpy dtype of "float32" / "float16" / "bfloat16" (also torch-style "torch.float16")."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
        return np.dtype(_DTYPES[key])
    return np.dtype(dtype)
