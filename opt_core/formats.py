"""The checkpoint format registry: one entry per on-disk format, and the folder-level reading and writing that
every format shares (format detection, shard plans, index files, atomic writes, removing an earlier save).

| format        | single file        | sharded (+ index.json)            | names | module             |
|---------------|--------------------|-----------------------------------|-------|--------------------|
| "safetensors" | model.safetensors  | model-0000i-of-0000N.safetensors  | torch | `safetensors_file` |
| "pytorch"     | pytorch_model.bin  | pytorch_model-0000i-of-0000N.bin  | torch | `torch_pickle`     |
| "tf"          | tf_model.h5        | tf_model-0000i-of-0000N.h5        | keras | `keras_h5`         |
| "flax"        | flax_model.msgpack | flax_model-0000i-of-0000N.msgpack | flax  | `flax_msgpack`     |

Adding a format is one module that reads and writes one file, plus one `Format` entry in `FORMATS`. Tensors here
are named as the file names them (`opt_core.weights` maps them to canonical names); `opt_core.checkpoint` builds
`load_checkpoint` / `save_checkpoint` on top.

Saving (`write_tensors`) is one commit (`opt_core.files.FolderCommit`): every new file is written under a
temporary name, then a journal puts them in place and removes the weight files of an earlier save that would
otherwise load instead of the new ones or be mixed with them: a single file beside a new index, shards of another
count, and the weights of every other format. So a folder holds exactly one checkpoint, the one just written, even
after a crash at any moment; what was removed is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from opt_core import flax_msgpack, keras_h5, safetensors_file, torch_pickle
from opt_core.errors import CheckpointError
from opt_core.files import (
    FolderCommit,
    check_not_lfs_pointer,
    complete_interrupted_save,
    index_json_text,
    is_shard_of,
    parse_size,
    plan_shards,
    read_head,
    read_index,
    shard_file_name,
)
from opt_core.lazy import LazyTensor

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# The instance names HF's TF port gives its models: the first part of every name in tf_model.h5 (ignored on
# read; written so files look like HF's).
KERAS_INSTANCE_NAMES = {
    "base": "tfopt_model",
    "causal_lm": "tfopt_for_causal_lm",
    "sequence_classification": "tfopt_for_sequence_classification",
    "question_answering": "tfopt_for_question_answering",
}

Tensors = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Format:
    """One on-disk checkpoint format.

    Args:
        name: the registry key, also `fmt=` everywhere ("safetensors", "pytorch", "tf", "flax").
        weights_name: the single file's name; shards and the index are named after it, as HF names them.
        style: the naming style of its tensors (`opt_core.weights.LEAF_RULES`).
        suffixes: file suffixes that identify the format when a file is given directly.
        read_file: one file -> {name: array}.
        write_file: ({name: array}, path, head) -> None; writes one whole-checkpoint file.
        read_sharded: index path -> {name: array}; the shards are beside the index.
        write_shard: ({name: array}, path, head) -> None; writes one shard file.
        index_key: (name, head) -> the tensor's key in the shard index.
        closes_empty_shard: HF's TF and Flax savers start a new shard even when the current one is empty.
        storable: the dtype a tensor of a dtype is stored in (HDF5 has no bfloat16).
    """

    name: str
    weights_name: str
    style: str
    suffixes: tuple[str, ...]
    read_file: Callable[[Path], dict[str, np.ndarray]]
    write_file: Callable[[Tensors, Path, str], None]
    read_sharded: Callable[[Path], dict[str, np.ndarray]]
    write_shard: Callable[[Tensors, Path, str], None]
    index_key: Callable[[str, str], str] = lambda name, head: name
    closes_empty_shard: bool = False
    storable: Callable[[np.dtype], np.dtype] = lambda dtype: dtype

    @property
    def index_name(self) -> str:
        return self.weights_name + ".index.json"

    def owns(self, file_name: str) -> bool:
        """Whether a file of a folder is part of a checkpoint of this format (single, shard or index)."""
        return file_name in (self.weights_name, self.index_name) or is_shard_of(file_name, self.weights_name)


def _not_a_pointer(read_file: Callable[[Path], dict[str, np.ndarray]]):
    """`read_file` behind the git-lfs pointer check, so every format names a pointer the same way."""

    def read(path: Path) -> dict[str, np.ndarray]:
        check_not_lfs_pointer(path, read_head(path))
        return read_file(path)

    return read


def _read_torch_style_shards(read_file: Callable[[Path], dict[str, np.ndarray]]):
    """Reader of HF's PyTorch-style shards: each shard a whole file of its own tensors, listed in the index."""

    def read_sharded(index_path: Path) -> dict[str, np.ndarray]:
        weight_map = read_index(index_path)
        tensors: dict[str, np.ndarray] = {}
        for shard in dict.fromkeys(weight_map.values()):
            found = read_file(index_path.parent / shard)
            tensors.update({k: v for k, v in found.items() if weight_map.get(k) == shard})
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise CheckpointError(f"{index_path} lists tensors its shards do not hold: {', '.join(absent[:10])}")
        return tensors

    return read_sharded


def _write_pickle(tensors: Tensors, path: Path, head: str) -> None:
    torch_pickle.save_state_dict(dict(tensors), path)


def _write_h5(tensors: Tensors, path: Path, head: str) -> None:
    keras_h5.write_h5(tensors, path, KERAS_INSTANCE_NAMES[head])


def _write_h5_shard(tensors: Tensors, path: Path, head: str) -> None:
    keras_h5.write_h5_shard(tensors, path, KERAS_INSTANCE_NAMES[head])


def _write_msgpack(tensors: Tensors, path: Path, head: str) -> None:
    flax_msgpack.write_msgpack(flax_msgpack.unflatten(dict(tensors)), path)


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    return flax_msgpack.flatten(flax_msgpack.read_msgpack(path), source=path)


def _read_msgpack_sharded(index_path: Path) -> dict[str, np.ndarray]:
    return flax_msgpack.flatten(flax_msgpack.read_msgpack_sharded(index_path), source=index_path)


def _widen_bfloat16(dtype: np.dtype) -> np.dtype:
    # HDF5 has no bfloat16: such weights are stored as float32, which holds every bfloat16 value exactly.
    return np.dtype(np.float32) if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype)


FORMATS: dict[str, Format] = {
    "safetensors": Format(
        name="safetensors",
        weights_name="model.safetensors",
        style="torch",
        suffixes=(".safetensors",),
        read_file=_not_a_pointer(safetensors_file.read_safetensors),
        write_file=lambda tensors, path, head: safetensors_file.write_safetensors(tensors, path),
        read_sharded=_read_torch_style_shards(_not_a_pointer(safetensors_file.read_safetensors)),
        write_shard=lambda tensors, path, head: safetensors_file.write_safetensors(tensors, path),
    ),
    "pytorch": Format(
        name="pytorch",
        weights_name="pytorch_model.bin",
        style="torch",
        suffixes=(".bin", ".pt", ".pth"),
        read_file=_not_a_pointer(torch_pickle.load_state_dict),
        write_file=_write_pickle,
        read_sharded=_read_torch_style_shards(_not_a_pointer(torch_pickle.load_state_dict)),
        write_shard=_write_pickle,
    ),
    "tf": Format(
        name="tf",
        weights_name="tf_model.h5",
        style="keras",
        suffixes=(".h5",),
        read_file=keras_h5.read_h5,
        write_file=_write_h5,
        read_sharded=keras_h5.read_h5_sharded,  # HF's TF shards are laid out unlike its single file
        write_shard=_write_h5_shard,
        index_key=lambda name, head: f"{KERAS_INSTANCE_NAMES[head]}/{name}",  # HF's TF index keeps the instance
        closes_empty_shard=True,
        storable=_widen_bfloat16,
    ),
    "flax": Format(
        name="flax",
        weights_name="flax_model.msgpack",
        style="flax",
        suffixes=(".msgpack",),
        read_file=_read_msgpack,
        write_file=_write_msgpack,
        read_sharded=_read_msgpack_sharded,
        write_shard=_write_msgpack,
        closes_empty_shard=True,
    ),
}
# A folder holding several formats is read in this order unless the caller names one.
READ_ORDER = ("safetensors", "pytorch", "flax", "tf")


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


# ----- reading


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> tuple[str, Path]:
    """(format, file or index path) of the checkpoint in a folder or file; `fmt` forces a format.

    A folder's single file is taken before its index, as HF does; `write_tensors` never leaves both.
    """
    path = Path(path)
    complete_interrupted_save(path)  # a save killed after its commit point is finished before anything is read
    if path.is_file():
        return _format_of_file(path, fmt), path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: not a file or folder")
    candidates = [get_format(fmt)] if fmt else [FORMATS[name] for name in READ_ORDER]
    for entry in candidates:
        for name in (entry.weights_name, entry.index_name):
            if (path / name).is_file():
                return entry.name, path / name
    wanted = ", ".join(entry.weights_name for entry in candidates)
    raise CheckpointError(f"no checkpoint in {path}: looked for {wanted} (or their .index.json)")


def _format_of_file(path: Path, fmt: str | None) -> str:
    if fmt:
        return get_format(fmt).name
    suffix = Path(path.name.removesuffix(".index.json")).suffix
    for entry in FORMATS.values():
        if suffix in entry.suffixes:
            return entry.name
    raise CheckpointError(f"cannot tell the checkpoint format of {path} from its name")


def read_checkpoint(path: str | os.PathLike, fmt: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """(format, {name as the file spells it: array}) of a folder, single file, or shard index.

    Safetensors and `.bin` arrays are read-only views of memory-mapped files.
    """
    fmt, file = detect_format(path, fmt)
    entry = FORMATS[fmt]
    if file.name.endswith(".index.json"):
        return fmt, dict(entry.read_sharded(file))
    return fmt, dict(entry.read_file(file))


# ----- writing


def storable_tensors(tensors: Mapping[str, np.ndarray], fmt: str, dtype: np.dtype | None = None):
    """The tensors as `fmt` stores them: cast to `dtype` when given, then to a dtype the format can hold.

    Casts are lazy (`LazyTensor`): each tensor is converted while it is written, never the model at once.
    """
    entry = get_format(fmt)
    out = {}
    for name, array in tensors.items():
        target = entry.storable(np.dtype(dtype) if dtype is not None else np.dtype(array.dtype))
        out[name] = array if np.dtype(array.dtype) == target else LazyTensor.wrap(array, name).astype(target)
    return out


def write_tensors(
    tensors: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    fmt: str,
    *,
    head: str = "causal_lm",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: np.dtype | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> list[Path]:
    """Writes tensors (named as `fmt` names them) into `folder`, sharded above `max_shard_size`, as HF does.

    One commit (`opt_core.files.FolderCommit`): every file is written under a temporary name and synced, then a
    journal puts them all in place and removes the weight files of an earlier save that the new one does not
    overwrite (see the module docstring). A crash at any moment leaves the previous checkpoint or the new one,
    never a mix; an error (a full disk) leaves the previous one and raises CheckpointWriteError naming the file.
    Returns the weight files written: the single file, or the shards in order followed by the index.

    Args:
        tensors: {name: array or LazyTensor} in the order HF writes them.
        folder: created if needed.
        fmt: a key of `FORMATS`.
        head: the model's head ("base", "causal_lm", ...): TF files carry HF's instance name for it.
        max_shard_size: bytes, or a size such as "5GB" (10**9) or "5GiB" (2**30).
        dtype: cast every tensor to this dtype on the way out, one tensor at a time.
        extra_files: {file name: bytes, or text written as UTF-8} committed with the weights (config.json,
            generation_config.json, a trainer's optimizer state, tokenizer files), so that no crash or failed save
            mixes them with another save's.
    """
    entry = get_format(fmt)
    folder = Path(folder)
    tensors = storable_tensors(tensors, fmt, dtype)
    max_bytes = parse_size(max_shard_size)
    extra_files = dict(extra_files or {})
    clashes = sorted(name for name in extra_files if any(e.owns(name) for e in FORMATS.values()))
    if clashes:
        raise ValueError(f"extra_files may not name weight files: {', '.join(clashes)}")
    folder.mkdir(parents=True, exist_ok=True)
    complete_interrupted_save(folder)
    sizes = {name: int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize for name, array in tensors.items()}
    shards = plan_shards(sizes, max_bytes, close_empty=entry.closes_empty_shard)
    with FolderCommit(folder) as commit:
        if len(shards) == 1:
            names = [entry.weights_name]
            entry.write_file(tensors, commit.path(entry.weights_name), head)
        else:
            names = [shard_file_name(entry.weights_name, i, len(shards)) for i in range(len(shards))]
            weight_map = {}
            for name, members in zip(names, shards, strict=True):
                entry.write_shard({k: tensors[k] for k in members}, commit.path(name), head)
                weight_map.update({entry.index_key(k, head): name for k in members})
            commit.write(entry.index_name, index_json_text(sum(sizes.values()), weight_map))
            names.append(entry.index_name)
        for name, data in extra_files.items():
            commit.write(name, data)
        removed = commit.commit(removals=lambda: other_weights(folder, keep=set(names)))
    if removed:
        logger.warning("removed the earlier weights in %s that the new save replaces: %s", folder, ", ".join(removed))
    return [folder / name for name in names]


def other_weights(folder: Path, keep: set[str]) -> list[str]:
    """The checkpoint files of any format in `folder` except `keep`: an earlier save's weights, which a new save
    removes in its commit.

    Those are a single file beside a new index (read first, as HF does), shards of another count (mixed with the
    new ones), or another format's weights (loaded when that format is asked for).
    """
    return [
        path.name
        for path in sorted(folder.iterdir())
        if path.name not in keep and path.is_file() and any(entry.owns(path.name) for entry in FORMATS.values())
    ]
