"""HF's TensorFlow checkpoint format (`tf_model.h5`, Keras-2 HDF5 weights), read/written with h5py.

Siblings: `opt_core.flax_msgpack` (HF's `flax_model.msgpack`), `opt_core.safetensors_file` and
`opt_core.torch_pickle`, each one format of the registry in `opt_core.formats`. Nothing here imports tensorflow
or keras.

Weight names
------------
Keras 2 names a variable by its name scopes: `<instance>/<layer>/.../<leaf>:0`, e.g.
`tfopt_for_causal_lm/model/decoder/layers.0/self_attn/q_proj/kernel:0`. The leading instance name
(`tfopt_for_causal_lm`, `tfopt_for_causal_lm_1`, `tfopt_model`, ...) depends on how many models the
writing process had built, so HF ignores it on read. This module's keys are names WITHOUT it
(`model/decoder/layers.0/self_attn/q_proj/kernel:0`); readers report the instance name they found.

Single file (`model.save_weights("tf_model.h5")`, tf-keras `legacy/hdf5_format.py`
`save_weights_to_hdf5_group`; read by HF `modeling_tf_utils.load_tf_weights_from_h5`)
---------------------------------------------------------------------------------
- Root attributes: `layer_names` = names of the model's top-level layers in `model.layers` order
  (for HF's OPT just `model`), `backend` = `b"tensorflow"`, `keras_version` = e.g. `b"2.21.0"`.
- One group per top-level layer, created in sorted name order, with attribute `weight_names` =
  the layer's full weight names (instance name included), trainable then non-trainable weights.
- Each weight is a dataset at `<layer>/<full weight name>`, e.g.
  `model/tfopt_for_causal_lm/model/decoder/embed_tokens/weight:0` (h5py makes a group per `/`),
  with the variable's shape and dtype, contiguous, uncompressed.
- tf-keras >= 2.13 adds a group `top_level_model_weights` whose `weight_names` lists weights owned
  by the model itself; HF models have none, so it holds an empty list. It is not in `layer_names`,
  readers ignore it, and HF's hub files predate it.
- String list attributes are written by `save_attributes_to_hdf5_group`: a list of utf-8 `bytes`
  stored as one attribute (h5py 3 makes it variable-length ASCII strings; older h5py fixed-length),
  or, when the `np.asarray` of the list (dtype `S<longest>`) exceeds `HDF5_OBJECT_HEADER_LIMIT`
  (64512) bytes, split with `np.array_split` into the fewest equal-ish chunks under the limit and
  stored as fixed-length strings in attributes `<name>0`, `<name>1`, ... (large models' weight
  lists). An empty list becomes an empty float64 array. Readers accept all of these.
- Read: the weight name's first `/` component is dropped; the value is `group[full name]`.
  A Keras-2 `model.save()` file keeps the same layout under a `model_weights` group; it is read too.
  Keras 3 `.weights.h5` files are a different format.

Sharded (HF `modeling_tf_utils.py`: `tf_shard_checkpoint`, `save_pretrained`, `load_tf_shard`)
-----------------------------------------------------------------------------------------
Not written by Keras but by HF directly, and laid out differently from the single file:
- Weights are split greedily in `model.weights` order by `size * dtype.size` bytes, exactly as
  for Flax (`opt_core.files.plan_shards`; `opt_core.formats` writes the shards and the index); one
  shard means a plain `tf_model.h5`.
- Files `tf_model-00001-of-0000N.h5` and `tf_model.h5.index.json` =
  `json.dumps({"metadata": {"total_size": N}, "weight_map": {full weight name: shard file}},
  indent=2, sort_keys=True) + "\\n"`. The index keys KEEP the instance name.
- In each shard, weights sorted by full name are datasets at the root, named by the full name
  without its first component (`model/decoder/layers.0/fc1/kernel:0`), except that names
  containing `model.` or having no `/` are stored whole; the root's only attribute is
  `layer_names` = those dataset names (utf-8, chunked as above). No `weight_names`, `backend` or
  `keras_version`, no per-layer groups.
- Read: HF opens `sorted(set(weight_map.values()))` and takes every dataset in `layer_names`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from opt_core.errors import CheckpointError
from opt_core.files import check_not_lfs_pointer, read_head, read_index
from opt_core.flax_msgpack import unflatten

__all__ = [
    "HDF5_OBJECT_HEADER_LIMIT",
    "H5Weights",
    "read_h5",
    "read_h5_sharded",
    "write_h5",
    "write_h5_shard",
]

# What tf-keras writes into the root attributes; HF never reads them.
KERAS_BACKEND = "tensorflow"
KERAS_VERSION = "2.21.0"
# tf-keras' limit for one attribute (the HDF5 object header is 64 KiB).
HDF5_OBJECT_HEADER_LIMIT = 64512
_TOP_LEVEL_GROUP = "top_level_model_weights"
# Kinds h5py stores natively; bfloat16 would silently become opaque 2-byte records.
_STORABLE_KINDS = "biufc"


class H5Weights(dict):
    """Weights read from a Keras h5 file: `{name without instance: np.ndarray}`.

    Attributes:
        instance_name: The leading name component found in the file (`tfopt_for_causal_lm`), or
            `""` when the file holds no weights.
    """

    def __init__(self, *args, instance_name: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.instance_name = instance_name


# --------------------------------------------------------------------------------------------------
# attributes, as tf-keras saves and loads them


def save_attributes(group: h5py.Group, name: str, data: list[bytes]) -> None:
    """Store a list of byte strings as tf-keras' `save_attributes_to_hdf5_group` does."""
    too_long = [x for x in data if len(x) > HDF5_OBJECT_HEADER_LIMIT]
    if too_long:
        raise CheckpointError(f"names longer than {HDF5_OBJECT_HEADER_LIMIT} bytes: {too_long}")
    data_npy = np.asarray(data)
    num_chunks = 1
    chunks = np.array_split(data_npy, num_chunks)
    while any(chunk.nbytes > HDF5_OBJECT_HEADER_LIMIT for chunk in chunks):
        num_chunks += 1
        chunks = np.array_split(data_npy, num_chunks)
    if num_chunks > 1:
        for chunk_id, chunk in enumerate(chunks):
            group.attrs[f"{name}{chunk_id}"] = chunk
    else:
        # The list itself, not data_npy: h5py stores a list of bytes as variable-length strings.
        group.attrs[name] = data


def load_attributes(group: h5py.Group, name: str) -> list[str] | None:
    """Read `name` or its chunks `name0`, `name1`, ...; None when neither exists.

    Raises:
        CheckpointError: An entry is not a string.
    """
    if name in group.attrs:
        values = list(group.attrs[name])
    elif f"{name}0" in group.attrs:
        values, chunk_id = [], 0
        while f"{name}{chunk_id}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk_id}"])
            chunk_id += 1
    else:
        return None
    names = [v.decode("utf8") if isinstance(v, bytes) else v for v in values]
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"attribute {name!r} of {group.name!r} holds non-strings: {bad[:3]}")
    return names


# --------------------------------------------------------------------------------------------------
# reading


@contextlib.contextmanager
def _open_for_read(path: Path) -> Iterator[h5py.File]:
    """Open an HDF5 file and turn every h5py failure inside the block into a CheckpointError."""
    check_not_lfs_pointer(path, read_head(path))
    try:
        with h5py.File(path, "r") as f:
            yield f
    except CheckpointError:
        raise
    # h5py reports a bad signature, truncation and corrupt objects as OSError (sometimes KeyError
    # or RuntimeError for broken links / headers).
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({e})") from None


def _member(parent: h5py.Group, name: str, path: Path, what: str):
    """`parent[name]`, reached through hard links only, or None when absent.

    Soft and external links are refused: an external link opens another file of the machine, and a soft link can
    make one weight read another's bytes; Keras and HF write neither.
    """
    node = parent
    for part in name.split("/"):
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) and part else None
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            kind = type(link).__name__
            raise CheckpointError(f"{path}: {what} {name!r} is reached through a {kind}, which tf_model.h5 never holds")
        node = node[part]
    return node


def _dataset(parent: h5py.Group, name: str, path: Path, what: str) -> np.ndarray:
    node = _member(parent, name, path, what)
    if not isinstance(node, h5py.Dataset):
        raise CheckpointError(f"{path}: {what} {name!r} has no dataset")
    # A dataset may keep its bytes outside the file (external storage, or a virtual dataset mapping other files):
    # reading it would read another file of the machine. Keras and HF write neither.
    if node.external or node.is_virtual:
        raise CheckpointError(f"{path}: {what} {name!r} stores its data outside the file, which is refused")
    nbytes, size = node.size * node.dtype.itemsize, path.stat().st_size
    if nbytes > size:  # Keras and HF never compress, so no real weight is larger than its file
        raise CheckpointError(f"{path}: {what} {name!r} claims {nbytes} bytes, more than the file's {size}")
    offset = node.id.get_offset()  # None unless the data is one allocated, contiguous block
    if offset is not None and node.ndim and node.chunks is None and node.dtype.kind in _STORABLE_KINDS:
        # Keras and HF write contiguous, unfiltered datasets: map them, as safetensors, instead of copying.
        if offset + nbytes > size:
            raise CheckpointError(f"{path}: {what} {name!r} runs past the end of the file (truncated?)")
        return _Located(path.name, offset, node.dtype.str, list(node.shape))
    return np.asarray(node)  # as HF does; node[()] would give a numpy scalar for 0-d weights


def _strip_instance(full_name: str) -> tuple[str, str]:
    """`inst/model/x:0` -> (`inst`, `model/x:0`); a name without `/` has no instance part."""
    instance, sep, rest = full_name.partition("/")
    return (instance, rest) if sep else ("", full_name)


def _not_keras(path: Path, missing: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a Keras weights file (no {missing!r} attribute); expected HF's tf_model.h5 "
        "written by Keras 2 save_weights (Keras 3 '.weights.h5' files are another format)"
    )


def read_h5(path: str | os.PathLike) -> H5Weights:
    """Read a single-file Keras-2 h5 weights file such as HF's `tf_model.h5` (see `_parse_h5`).

    The HDF5 structure is parsed in a child process (`_in_child`): libhdf5 can hang or crash on a crafted file.
    """
    return _in_child("file", Path(path))


def read_h5_sharded(index_path: str | os.PathLike) -> H5Weights:
    """Read HF's sharded TF checkpoint from its `tf_model.h5.index.json` (see `_parse_h5_sharded`), parsed in a
    child process as `read_h5`."""
    return _in_child("index", Path(index_path))


def _parse_h5(path: str | os.PathLike) -> H5Weights:
    """Read a single-file Keras-2 h5 weights file such as HF's `tf_model.h5`.

    Args:
        path: The `.h5` file.

    Returns:
        `H5Weights`: weight name without instance -> array, in file order; `.instance_name` is the
        first weight's leading component.

    Raises:
        CheckpointError: The file is missing, not HDF5, truncated or corrupt, lacks `layer_names` or
            a layer's `weight_names`, or a listed weight has no dataset or appears twice.
    """
    path = Path(path)
    weights = H5Weights()
    with _open_for_read(path) as f:
        root = f
        full_model_save = isinstance(_member(f, "model_weights", path, "group"), h5py.Group)
        if full_model_save and load_attributes(f, "layer_names") is None:
            root = f["model_weights"]  # a Keras-2 `model.save()` file
        layer_names = load_attributes(root, "layer_names")
        if layer_names is None:
            raise _not_keras(path, "layer_names")
        for layer in layer_names:
            group = _member(root, layer, path, "layer")
            if not isinstance(group, h5py.Group):
                raise CheckpointError(f"{path}: layer {layer!r} is listed but has no group")
            weight_names = load_attributes(group, "weight_names")
            if weight_names is None:
                raise _not_keras(path, f"{layer}/weight_names")
            for full_name in weight_names:
                instance, name = _strip_instance(full_name)
                if name in weights:
                    raise CheckpointError(f"{path}: weight {name!r} appears twice")
                weights.instance_name = weights.instance_name or instance
                weights[name] = _dataset(group, full_name, path, f"weight of layer {layer!r}")
    return weights


def _parse_h5_sharded(index_path: str | os.PathLike) -> H5Weights:
    """Read HF's sharded TF checkpoint from its `tf_model.h5.index.json`.

    Args:
        index_path: The index file; shards are looked up beside it.

    Returns:
        `H5Weights` as `read_h5` gives; `.instance_name` comes from the index's weight names.

    Raises:
        CheckpointError: The index or a shard is missing or corrupt, a shard lacks `layer_names`,
            or weights the index lists are absent from their shard.
    """
    index_path = Path(index_path)
    weight_map = read_index(index_path)
    first = next(iter(weight_map), "")
    weights = H5Weights(instance_name=_strip_instance(first)[0])
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        with _open_for_read(shard_path) as f:
            stored_names = load_attributes(f, "layer_names")
            if stored_names is None:
                raise _not_keras(shard_path, "layer_names")
            for stored in stored_names:
                # Stored names keep the instance exactly when the full name contains "model.".
                name = _strip_instance(stored)[1] if "model." in stored else stored
                weights[name] = _dataset(f, stored, shard_path, "weight")
    missing = [k for k in weight_map if _strip_instance(k)[1] not in weights]
    if missing:
        raise CheckpointError(f"{index_path}: weights it lists are in no shard: {missing}")
    return weights


# --------------------------------------------------------------------------------------------------
# the child process that parses HDF5
#
# libhdf5 is C code written for trusted files: fuzzing found a tf_model.h5 a few bytes away from a real one on
# which reading an attribute never returns (a corrupt global heap), and the library's history has crashes of the
# same kind. So the parsing runs in a child process with a time and memory limit; a hang or crash there becomes
# a CheckpointError naming the file, and the caller's interpreter is never at stake. The child sends back where
# each weight's bytes lie in the checkpoint file (Keras writes contiguous, unfiltered datasets); this process
# checks each location against the file's size and maps it, so the weights are never copied. Anything else
# (chunked or compressed data, 0-d weights) the child copies into a side file.

# Seconds the child may take: its work is the file's metadata, plus copying whatever is not contiguous.
CHILD_TIMEOUT_S = 120.0
_CHILD_BYTES_PER_S = 32 * 2**20
_CHILD_MEMORY = 2 * 2**30  # address space beyond twice the checkpoint's size (Python, numpy, h5py themselves)


class _Located(NamedTuple):
    """A contiguous dataset: `file` (a name in the checkpoint's folder) holds it at `offset`."""

    file: str
    offset: int
    dtype: str
    shape: list[int]


def _in_child(kind: str, path: Path) -> H5Weights:
    """`_parse_h5(path)` ("file") or `_parse_h5_sharded(path)` ("index") run in a child process."""
    size = _total_size(path)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="opt-h5-") as tmp:
        side = Path(tmp) / "copied"
        command = [sys.executable, "-c", _CHILD_MAIN, kind, str(path), str(side)]
        timeout = CHILD_TIMEOUT_S + size / _CHILD_BYTES_PER_S
        try:
            # No preexec_fn: it would make Python fork (running JAX's and others' at-fork hooks and warnings) where
            # it can otherwise spawn; the child limits its own memory first thing.
            done = subprocess.run(command, env=env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CheckpointError(
                f"{path}: the HDF5 library did not finish reading the file in {timeout:.0f} s; it is corrupt or crafted"
            ) from None
        reply = done.stdout.decode("utf-8", "replace").strip().rpartition("\n")[2]
        if done.returncode != 0 or not reply.startswith("{"):
            how = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"failed ({done.returncode})"
            detail = done.stderr.decode("utf-8", "replace").strip().rpartition("\n")[2][:300]
            raise CheckpointError(
                f"{path}: the HDF5 library {how} reading the file; it is corrupt or crafted ({detail or 'no message'})"
            )
        manifest = json.loads(reply)
        if "error" in manifest:
            raise CheckpointError(manifest["error"])
        return _weights_of(manifest, path, side)


_CHILD_MAIN = "import sys; from opt_core.keras_h5 import _child_main; _child_main(*sys.argv[1:])"


def _total_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # the child names the missing file


def _limit_memory(size: int) -> None:
    """Caps this (child) process's address space, so a file that makes libhdf5 allocate wildly gets MemoryError."""
    if os.name == "posix":
        import resource

        cap = _CHILD_MEMORY + 2 * size
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _child_main(kind: str, path: str, side: str) -> None:
    """The child: parses, copies what cannot be mapped into `side`, prints the manifest (or the error) as JSON."""
    _limit_memory(_total_size(Path(path)))
    try:
        weights = _parse_h5(path) if kind == "file" else _parse_h5_sharded(path)
        entries = []
        with open(side, "wb") as out:
            for name, value in weights.items():
                if isinstance(value, _Located):
                    entries.append([name, *value])
                else:
                    array = np.asarray(value)
                    entries.append([name, None, out.tell(), array.dtype.str, list(array.shape)])
                    out.write(array.tobytes())  # C order; tofile would flatten a 0-d weight to 1-d
        reply = {"instance_name": weights.instance_name, "weights": entries}
    except CheckpointError as error:
        reply = {"error": str(error)}
    except MemoryError:
        reply = {"error": f"{path}: reading it needs far more memory than its size; it is corrupt or crafted"}
    except Exception as error:  # h5py raises many types on corrupt structures; never a traceback from the child
        reply = {"error": f"{path}: not a readable Keras h5 file ({type(error).__name__}: {error})"}
    print(json.dumps(reply), flush=True)


def _weights_of(manifest: dict, path: Path, side: Path) -> H5Weights:
    """The child's manifest as arrays: mapped from the checkpoint's files (each location checked) or the side file."""
    folder = path.parent
    weights = H5Weights(instance_name=str(manifest["instance_name"]))
    for name, file, offset, dtype, shape in manifest["weights"]:
        dtype = np.dtype(dtype)
        if dtype.kind not in _STORABLE_KINDS or any(not isinstance(n, int) or n < 0 for n in shape):
            raise CheckpointError(f"{path}: weight {name!r} has an unreadable type {dtype} or shape {shape}")
        source = side if file is None else folder / Path(file).name
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if offset < 0 or offset + nbytes > source.stat().st_size:
            raise CheckpointError(f"{path}: weight {name!r} runs past the end of {source.name}")
        if file is None:
            weights[name] = np.fromfile(source, dtype, int(np.prod(shape)), offset=offset).reshape(tuple(shape))
        else:
            weights[name] = np.memmap(source, dtype=dtype, mode="r", offset=offset, shape=tuple(shape)).view(np.ndarray)
    return weights


# --------------------------------------------------------------------------------------------------
# writing


def _checked(weights: Mapping[str, object], instance_name: str) -> dict[str, np.ndarray]:
    if not instance_name or "/" in instance_name:
        raise CheckpointError(f"instance name {instance_name!r} must be one non-empty name part")
    arrays = {}
    for name, value in weights.items():
        if not name or any(part == "" for part in name.split("/")):
            raise CheckpointError(f"weight name {name!r} has an empty '/' component")
        # Array-likes (memory-mapped or lazily computed tensors) are read only when their dataset is written.
        array = value if all(hasattr(value, a) for a in ("shape", "dtype", "__array__")) else np.asarray(value)
        if np.dtype(array.dtype).kind not in _STORABLE_KINDS:
            raise CheckpointError(
                f"cannot write {name!r}: dtype {array.dtype} has no native HDF5 type "
                "(cast bfloat16 to float32 or float16 first)"
            )
        arrays[name] = array
    unflatten(dict.fromkeys(arrays))  # raises if one name is a prefix "directory" of another
    if _TOP_LEVEL_GROUP in {name.split("/", 1)[0] for name in arrays}:
        raise CheckpointError(f"{_TOP_LEVEL_GROUP!r} is reserved by Keras for its own group")
    return arrays


def _store(parent: h5py.Group, name: str, array: np.ndarray) -> None:
    dataset = parent.create_dataset(name, array.shape, dtype=array.dtype)
    if array.shape:
        dataset[:] = np.asarray(array)
    else:
        dataset[()] = np.asarray(array)  # scalars cannot be sliced


def _save_subset(group: h5py.Group, items: list[tuple[str, np.ndarray]]) -> None:
    """tf-keras' `save_subset_weights_to_hdf5_group`: names attribute, then one dataset each."""
    save_attributes(group, "weight_names", [name.encode("utf8") for name, _ in items])
    for name, array in items:
        _store(group, name, array)


@contextlib.contextmanager
def _create(path: Path) -> Iterator[h5py.File]:
    # Written directly: `opt_core.formats` gives the file a temporary name and renames it once complete.
    with h5py.File(path, "w") as f:
        yield f


def write_h5(weights: Mapping[str, object], path: str | os.PathLike, instance_name: str) -> None:
    """Write weights in the layout of Keras-2 `save_weights` to h5, as HF's `tf_model.h5`.

    Args:
        weights: Name without instance (`model/decoder/layers.0/fc1/kernel:0`) -> array. The first
            `/` component is the top-level Keras layer; layers are listed in first-seen order and
            weights in the given order.
        path: Destination file (`opt_core.formats` stages it under a temporary name).
        instance_name: Leading name component to write, e.g. `tfopt_for_causal_lm`.

    Raises:
        CheckpointError: A name or dtype cannot be stored (bfloat16 has no HDF5 type).
    """
    arrays = _checked(weights, instance_name)
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, array in arrays.items():
        layers.setdefault(name.split("/", 1)[0], []).append((f"{instance_name}/{name}", array))
    with _create(Path(path)) as f:
        save_attributes(f, "layer_names", [layer.encode("utf8") for layer in layers])
        f.attrs["backend"] = KERAS_BACKEND.encode("utf8")
        f.attrs["keras_version"] = KERAS_VERSION.encode("utf8")
        # Keras creates the groups in sorted order so no group name is created after its prefix.
        for layer in sorted(layers):
            _save_subset(f.create_group(layer), layers[layer])
        _save_subset(f.create_group(_TOP_LEVEL_GROUP), [])


def _shard_dataset_name(full_name: str) -> str:
    # HF's save_pretrained rule, kept verbatim so its load_tf_shard finds every weight.
    if "model." in full_name or len(full_name.split("/")) == 1:
        return full_name
    return full_name.split("/", 1)[1]


def write_h5_shard(weights: Mapping[str, object], path: str | os.PathLike, instance_name: str) -> None:
    """Write one shard of HF's sharded TF checkpoint (`opt_core.formats` plans the shards and writes the index).

    Unlike the single file, a shard has no layer groups: `layer_names` lists its datasets, named as HF's TF
    `save_pretrained` names them, in sorted order.

    Args:
        weights: Names without instance, as for `write_h5`.
        path: Destination file (`opt_core.formats` stages it under a temporary name).
        instance_name: Leading name component, e.g. `tfopt_for_causal_lm`.
    """
    arrays = _checked(weights, instance_name)
    full = {f"{instance_name}/{name}": array for name, array in arrays.items()}
    with _create(Path(path)) as f:
        stored = []
        for full_name in sorted(full):
            _store(f, _shard_dataset_name(full_name), full[full_name])
            stored.append(_shard_dataset_name(full_name).encode("utf8"))
        save_attributes(f, "layer_names", stored)
