"""Flax's msgpack checkpoint format (`flax_model.msgpack`), read and written without jax or flax.

Siblings: `opt_core.keras_h5` (HF's `tf_model.h5`), `opt_core.safetensors_file` and `opt_core.torch_pickle`, each
one format of the registry in `opt_core.formats`. The framework packages never parse files themselves.

On-disk format (flax `flax/serialization.py`, `to_bytes` / `msgpack_serialize` / `msgpack_restore`)
------------------------------------------------------------------------------------------------
A file is one msgpack object: the state dict, a map of maps whose leaves are tensors. HF's
`FlaxPreTrainedModel.save_pretrained` writes `flax.serialization.to_bytes(params)`, so for OPT the
top-level keys are `model` (and `lm_head` when untied) and the leaves sit at paths such as
`model/decoder/layers/0/self_attn/q_proj/kernel`. Encoding rules:

- Maps are msgpack maps whose keys are `str` (flax's `to_state_dict` turns keys into `str`, and
  lists / tuples into maps keyed `"0"`, `"1"`, ...). Map order is insertion order as given to
  `to_bytes`; `msgpack_serialize(tree)` without `in_place=True` first copies the tree with
  `jax.tree_util.tree_map`, which sorts keys (see `write_msgpack(..., sort_keys=True)`).
- An `np.ndarray` leaf is msgpack ExtType code 1 whose payload is
  `msgpack.packb((shape, dtype.name, arr.tobytes("C")), use_bin_type=True)`: an array of the shape
  as a list of ints, the numpy dtype name as str (`"float32"`, `"float16"`, `"int32"`,
  `"bfloat16"` for `ml_dtypes.bfloat16`, ...) and the row-major raw bytes, machine byte order
  (little-endian everywhere flax runs).
- A numpy scalar (`np.float32(1.0)`, ...) is ExtType code 3 with the same payload for the 0-d array;
  it reads back as a numpy scalar. A Python `complex` is ExtType code 2 with payload
  `msgpack.packb((real, imag))`. Python `None`/`bool`/`int`/`float`/`str`/`bytes` are native msgpack
  values (packed with `strict_types=True`, so `np.float64`, a `float` subclass, is a numpy scalar).
- An array with more than `MAX_CHUNK_SIZE` bytes (2**30; msgpack's bin type caps one object at
  2**31 - 1 bytes) is replaced by the map
  `{"__msgpack_chunked_array__": True, "shape": {"0": d0, "1": d1, ...},
  "chunks": {"0": c0, "1": c1, ...}}` where the `c_i` are consecutive 1-D slices of the flattened
  array, each `max(1, int(MAX_CHUNK_SIZE / itemsize))` elements long (the last one shorter).
  Reading re-joins them. Only arrays that are values of a map (or the whole tree) are chunked.

Reading follows `msgpack_restore`: `raw=False` (msgpack str -> `str`, bin -> `bytes`),
`strict_map_key=False`, arrays come back as read-only `np.frombuffer` views of the file's bytes.
Two deliberate differences from flax: an ExtType code other than 1, 2, 3 raises `CheckpointError`
naming its path in the tree (flax would hand back a raw `msgpack.ExtType`), and every decoding
failure is a `CheckpointError` naming the file. Besides `bfloat16`, any dtype name that numpy does
not know but `ml_dtypes` does (`float8_e4m3fn`, ...) is accepted.

Sharded checkpoints (HF `modeling_flax_utils.py`: `flax_shard_checkpoint`, `save_pretrained`,
`load_flax_sharded_weights`; `utils/hub.py`: `get_checkpoint_shard_files`)
-------------------------------------------------------------------------
- The tree is flattened with `flax.traverse_util.flatten_dict(params, sep="/")`: depth-first in
  map order, keys joined with `/` (`model/decoder/layers/0/fc1/kernel`), empty maps dropped.
- Shards are filled greedily in that order: before adding a tensor of `size * itemsize` bytes, if
  the current shard's byte count plus it exceeds `max_shard_size`, the current shard is closed.
  A tensor larger than the limit gets a shard of its own; if it is the very first tensor, HF closes
  the still empty first shard, which becomes a file holding an empty map (reproduced here).
- One shard: the file is `flax_model.msgpack`, holding `to_bytes(params)` of the original tree, and
  there is no index. Several: files `flax_model-00001-of-0000N.msgpack` (1-based, 5 digits), each
  holding `to_bytes(unflatten_dict(shard, sep="/"))`, i.e. a NESTED map of that shard's tensors,
  plus `flax_model.msgpack.index.json` =
  `json.dumps({"metadata": {"total_size": N}, "weight_map": {flat key: shard file}}, indent=2,
  sort_keys=True) + "\\n"`, where N is the sum of `size * itemsize` over all tensors.
- Loading reads `sorted(set(weight_map.values()))`, flattens each shard with `sep="/"` (so a shard
  stored as a flat map of `/`-joined keys loads the same), merges, and unflattens with `sep="/"`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from opt_core.errors import CheckpointError
from opt_core.files import check_not_lfs_pointer, read_index

__all__ = [
    "MAX_CHUNK_SIZE",
    "flatten",
    "read_msgpack",
    "read_msgpack_sharded",
    "unflatten",
    "write_msgpack",
]


# flax.serialization.MAX_CHUNK_SIZE: msgpack's hard limit is 2**31 - 1 bytes per object, flax keeps
# a margin. Read at call time, so tests can shrink it (as they shrink flax's) to exercise chunking.
MAX_CHUNK_SIZE = 2**30

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"


# --------------------------------------------------------------------------------------------------
# reading


class _BadExt:
    """Stands in for an undecodable ext value, so the error can name where in the tree it sits."""

    def __init__(self, problem: str):
        self.problem = problem


def _dtype_from_name(name: str) -> np.dtype:
    # numpy has no bfloat16 / float8 names; flax special-cases "bfloat16" (= ml_dtypes.bfloat16).
    try:
        return np.dtype(name)
    except TypeError:
        extension = getattr(ml_dtypes, name, None)
        if extension is None:
            raise ValueError(f"unknown dtype name {name!r}") from None
        return np.dtype(extension)


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    dtype = _dtype_from_name(dtype_name.decode("ascii"))
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="C")


def _ext_unpack(code: int, data: bytes) -> Any:
    if code not in (_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR):
        return _BadExt(f"unknown msgpack ext type {code}")
    try:
        if code == _EXT_COMPLEX:
            real, imag = msgpack.unpackb(data)
            return complex(real, imag)
        array = _ndarray_from_bytes(data)
        return array[()] if code == _EXT_NPSCALAR else array
    except Exception as e:  # any malformed payload; reported with its tree path by _restore
        return _BadExt(f"malformed {'complex' if code == _EXT_COMPLEX else 'array'} ({e})")


def _unchunk(data: dict, where: str) -> np.ndarray:
    try:
        shape = tuple(data["shape"][str(i)] for i in range(len(data["shape"])))
        chunks = [data["chunks"][str(i)] for i in range(len(data["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed chunked array at {where!r}: {e}") from None


def _restore(node: Any, where: str) -> Any:
    """Re-join chunked arrays and reject unknown ext types, as `_unchunk_array_leaves_in_place`."""
    if isinstance(node, _BadExt):
        raise ValueError(f"{node.problem} at {where or '<root>'!r}")
    if isinstance(node, dict):
        if _CHUNKED in node:
            return _unchunk(node, where)
        for key, value in node.items():
            node[key] = _restore(value, f"{where}/{key}" if where else str(key))
    elif isinstance(node, list):
        # flax leaves lists alone; walking them only adds the unknown-ext check.
        for i, value in enumerate(node):
            node[i] = _restore(value, f"{where}/{i}" if where else str(i))
    return node


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _decode(data: bytes, path: Path) -> Any:
    check_not_lfs_pointer(path, data)
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_unpack, raw=False, strict_map_key=False)
        return _restore(tree, "")
    # msgpack reports truncation and junk as ValueError subclasses (UnpackValueError, ExtraData,
    # FormatError, StackError); junk can also nest deeper than Python's recursion limit.
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a valid Flax msgpack checkpoint ({e})") from None


def read_msgpack(path: str | os.PathLike) -> dict:
    """Read a Flax msgpack file into the nested dict `flax.serialization.msgpack_restore` returns.

    Args:
        path: The `.msgpack` file.

    Returns:
        Nested dict of `np.ndarray` leaves (read-only views of the file's bytes), chunked arrays
        re-joined, bfloat16 as `ml_dtypes.bfloat16`.

    Raises:
        CheckpointError: The file is missing, truncated, not msgpack, a git-lfs pointer, holds an
            unknown ext type, or its top level is not a map.
    """
    path = Path(path)
    tree = _decode(_read_bytes(path), path)
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path}: top level is a {type(tree).__name__}, not a map of tensors; not a Flax checkpoint"
        )
    return tree


# --------------------------------------------------------------------------------------------------
# writing

_NATIVE = (type(None), bool, int, float, str, bytes)


def _to_state_dict(node: Any, where: str, sort_keys: bool) -> Any:
    """Mirror flax's `to_state_dict` on plain containers (plus jax's key sort when asked)."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple: flax maps its fields
        node = {field: getattr(node, field) for field in node._fields}
    elif isinstance(node, (list, tuple)):
        node = {str(i): value for i, value in enumerate(node)}
    if isinstance(node, Mapping):
        items = [(str(key), value) for key, value in node.items()]
        if len({key for key, _ in items}) != len(items):
            raise CheckpointError(f"keys at {where or '<root>'!r} are not unique as strings")
        if sort_keys:
            items.sort(key=lambda item: item[0])
        return {key: _to_state_dict(value, f"{where}/{key}" if where else key, sort_keys) for key, value in items}
    if isinstance(node, (np.ndarray, np.generic, complex)) or type(node) in _NATIVE:
        array = node
    elif hasattr(node, "__array__") and hasattr(node, "dtype") and hasattr(node, "shape"):
        # jax / tf / torch tensors and lazily computed ones: converted (as flax converts a jax.Array) only
        # when packed, so writing holds one tensor in memory at a time.
        array = node
    else:
        raise CheckpointError(f"cannot write {where!r}: unsupported type {type(node).__name__}")
    if isinstance(array, (np.ndarray, np.generic)) and (
        array.dtype.hasobject or array.dtype.isalignedstruct or array.dtype.fields is not None
    ):
        raise CheckpointError(f"cannot write {where!r}: object or structured dtype {array.dtype}")
    return array


def _chunk(array: np.ndarray) -> dict:
    array = np.asarray(array)
    chunksize = max(1, int(MAX_CHUNK_SIZE / array.dtype.itemsize))
    flat = array.reshape(-1)
    chunks = [flat[i : i + chunksize] for i in range(0, flat.size, chunksize)]
    # Key order matters for byte equality with flax: marker, shape, chunks.
    return {
        _CHUNKED: True,
        "shape": {str(i): d for i, d in enumerate(array.shape)},
        "chunks": {str(i): c for i, c in enumerate(chunks)},
    }


def _is_oversized(node: Any) -> bool:
    is_array = isinstance(node, np.ndarray) or (hasattr(node, "__array__") and not isinstance(node, np.generic))
    return is_array and node.size * np.dtype(node.dtype).itemsize > MAX_CHUNK_SIZE


def _chunk_leaves(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            node[key] = _chunk(value) if _is_oversized(value) else _chunk_leaves(value)
        return node
    return _chunk(node) if _is_oversized(node) else node


def _ndarray_to_bytes(array: np.ndarray) -> bytes:
    return msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)


def _ext_pack(x: Any) -> Any:
    if not isinstance(x, (np.ndarray, np.generic)) and hasattr(x, "__array__"):
        x = np.asarray(x)  # a tensor _to_state_dict left unconverted
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, _ndarray_to_bytes(x))
    if isinstance(x, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _ndarray_to_bytes(np.asarray(x)))
    if isinstance(x, complex):
        return msgpack.ExtType(_EXT_COMPLEX, msgpack.packb((x.real, x.imag)))
    raise TypeError(f"cannot serialize {type(x).__name__}")


def encode_msgpack(tree: Any, *, sort_keys: bool = False) -> bytes:
    """Encode `tree` to the bytes `flax.serialization.to_bytes(tree)` gives.

    Args:
        tree: Nested dicts (lists / tuples become `"0"`, `"1"`, ... maps as in flax) of numpy
            arrays, numpy scalars, array-likes with `__array__`/`dtype`/`shape`, Python scalars.
        sort_keys: Sort every map's keys. For a tree of str-keyed dicts this gives the bytes of
            `msgpack_serialize(tree)` without `in_place=True`, whose copy through `jax.tree_util`
            sorts keys; `to_bytes` (what HF writes) keeps the given order.

    Raises:
        CheckpointError: A leaf has an unsupported type or an object/structured dtype.
    """
    state = _chunk_leaves(_to_state_dict(tree, "", sort_keys))
    return msgpack.packb(state, default=_ext_pack, strict_types=True)


def write_msgpack(tree: dict, path: str | os.PathLike, *, sort_keys: bool = False) -> None:
    """Write `tree` as a Flax msgpack file, byte-identical to `flax.serialization.to_bytes(tree)`.

    The bytes are streamed map header by map header and tensor by tensor (a map encodes as its header followed
    by its keys and values), so memory holds one tensor's encoding at a time, not the file's.

    Args:
        tree: Nested dict of arrays (see `encode_msgpack` for accepted leaves).
        path: Destination file (`opt_core.formats` stages it under a temporary name).
        sort_keys: See `encode_msgpack`.
    """
    state = _chunk_leaves(_to_state_dict(tree, "", sort_keys))
    packer = msgpack.Packer(default=_ext_pack, strict_types=True)
    # Written directly: `opt_core.formats` gives the file a temporary name and renames it once complete.
    with open(path, "wb") as file:
        _pack_into(file, state, packer)


def _pack_into(file: Any, node: Any, packer: msgpack.Packer) -> None:
    if isinstance(node, dict):
        file.write(packer.pack_map_header(len(node)))
        for key, value in node.items():
            file.write(packer.pack(key))
            _pack_into(file, value, packer)
    else:
        file.write(packer.pack(node))


# --------------------------------------------------------------------------------------------------
# flat <-> nested


def _walk(node: Mapping, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in node.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _walk(value, path)  # empty maps yield nothing, as flatten_dict drops them
        else:
            yield path, value


def flatten(tree: Mapping, sep: str = "/", *, source: str | os.PathLike | None = None) -> dict:
    """Flatten a nested dict of arrays like `flax.traverse_util.flatten_dict(tree, sep=sep)`.

    Args:
        tree: Nested dict whose leaves must all be `np.ndarray`.
        sep: Joins the keys of one path.
        source: File the tree came from, named in errors.

    Returns:
        `{"a/b/kernel": array}` in depth-first map order; empty maps are dropped.

    Raises:
        CheckpointError: A leaf is not an array (named by its path), e.g. a chunk marker or a str.
    """
    flat = {}
    for path, value in _walk(tree, ()):
        key = sep.join(path)
        if not (isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "shape"))):
            origin = f"{source}: " if source is not None else ""
            raise CheckpointError(f"{origin}{key!r} is a {type(value).__name__}, expected an array")
        flat[key] = value
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """Inverse of `flatten`, like `flax.traverse_util.unflatten_dict(flat, sep=sep)`.

    Raises:
        CheckpointError: One key is both a tensor and the prefix of another key.
    """
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(sep)
        node = tree
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{sep.join(parents[: i + 1])!r} is a tensor and also a prefix of {key!r}")
        if isinstance(node.get(leaf), dict):
            raise CheckpointError(f"{key!r} is a tensor and also a prefix of other keys")
        node[leaf] = value
    return tree


# --------------------------------------------------------------------------------------------------
# sharded checkpoints


def read_msgpack_sharded(index_path: str | os.PathLike) -> dict:
    """Read a sharded Flax checkpoint from its `flax_model.msgpack.index.json`.

    Args:
        index_path: The index file; shards are looked up beside it.

    Returns:
        The nested dict of arrays, as HF's `load_flax_sharded_weights` builds it.

    Raises:
        CheckpointError: The index or a shard is missing or corrupt, a shard holds a non-array
            leaf, or tensors named in the index are absent from their shard.
    """
    index_path = Path(index_path)
    weight_map = read_index(index_path)
    merged: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        found = flatten(read_msgpack(shard_path), source=shard_path)
        missing = [k for k, v in weight_map.items() if v == shard and k not in found]
        if missing:
            raise CheckpointError(f"{shard_path}: lacks tensors the index puts there: {missing}")
        merged.update(found)
    return unflatten(merged)
