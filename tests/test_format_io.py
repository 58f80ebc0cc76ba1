"""Byte-level tests of `opt_core.flax_msgpack` and `opt_core.keras_h5`.

Oracles: `flax.serialization` (bytes and restore), `flax.traverse_util` driven by HF's sharding
steps, and tf-keras' legacy h5 saver when `tf_keras` is installed; the h5 layout documented in
`opt_core/keras_h5.py` is also asserted directly, and HF's h5 reading steps are replayed
on our files.
"""

from __future__ import annotations

import json
import string

import h5py
import ml_dtypes
import msgpack
import numpy as np
import pytest

from opt_core import flax_msgpack, keras_h5
from opt_core.errors import CheckpointError
from opt_core.flax_msgpack import (
    flatten,
    read_msgpack,
    read_msgpack_sharded,
    unflatten,
    write_msgpack,
)
from opt_core.formats import write_tensors
from opt_core.keras_h5 import read_h5, read_h5_sharded, write_h5

serialization = pytest.importorskip("flax.serialization")


def write_names(tensors, folder, max_shard_size, fmt="flax"):
    """Writes through the format registry (nested Flax trees are flattened first); returns the file names."""
    if fmt == "flax":
        tensors = flatten(tensors)
    return [path.name for path in write_tensors(tensors, folder, fmt, max_shard_size=max_shard_size)]


traverse_util = pytest.importorskip("flax.traverse_util")

LEAF_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32]
INSTANCE = "tfopt_for_causal_lm"


def random_array(rng, dtype, shape):
    if np.dtype(dtype).kind == "i":
        return rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int32)
    # Random bit patterns: NaN payloads, infinities and subnormals must survive bit-exactly too.
    bits = {2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
    return rng.integers(0, np.iinfo(bits).max, size=shape, dtype=bits, endpoint=True).view(dtype)


def random_tree(rng, depth=0):
    tree = {}
    for _ in range(rng.integers(1, 5)):
        key = "".join(rng.choice(list(string.ascii_lowercase + "._0123456789"), rng.integers(1, 8)))
        if depth < 3 and rng.random() < 0.4:
            tree[key] = random_tree(rng, depth + 1)
        else:
            shape = tuple(rng.integers(0, 5, size=rng.integers(0, 4)))
            tree[key] = random_array(rng, LEAF_DTYPES[rng.integers(len(LEAF_DTYPES))], shape)
    return tree


def assert_same(a, b, where="<root>"):
    """Equal structure, key order, leaf types, dtypes, shapes and bits."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------------------------------
# flax msgpack


@pytest.mark.parametrize("seed", range(8))
def test_msgpack_bytes_and_restore_match_flax(tmp_path, seed):
    tree = random_tree(np.random.default_rng(seed))
    path = tmp_path / "flax_model.msgpack"
    write_msgpack(tree, path)
    assert path.read_bytes() == serialization.to_bytes(tree)
    assert_same(read_msgpack(path), serialization.msgpack_restore(path.read_bytes()))
    assert_same(read_msgpack(path), tree)


def test_msgpack_scalars_and_python_values_match_flax(tmp_path):
    tree = {
        "b": {"np_scalar": np.float32(1.5), "bf16_scalar": ml_dtypes.bfloat16(2.0), "i": 7},
        "a": {"f": 0.25, "c": 1 + 2j, "none": None, "s": "text", "raw": b"\x00\x01", "t": True},
        "list": [np.arange(3, dtype=np.int32), 4],
        "empty": {},
    }
    path = tmp_path / "x.msgpack"
    write_msgpack(tree, path)
    assert path.read_bytes() == serialization.to_bytes(tree)
    assert_same(read_msgpack(path), serialization.msgpack_restore(path.read_bytes()))
    # msgpack_serialize without in_place copies the tree through jax, which sorts keys.
    nested = {"z": {"y": np.ones(2, np.float16), "x": np.float32(1)}, "a": np.zeros(3, np.int32)}
    assert flax_msgpack.encode_msgpack(nested, sort_keys=True) == serialization.msgpack_serialize(nested)


@pytest.mark.parametrize("chunk_bytes", [4, 24, 64])
def test_msgpack_chunking_matches_flax(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", chunk_bytes)
    monkeypatch.setattr(flax_msgpack, "MAX_CHUNK_SIZE", chunk_bytes)
    rng = np.random.default_rng(chunk_bytes)
    tree = {
        "big": random_array(rng, np.float32, (5, 7)),
        "inner": {"bf16": random_array(rng, ml_dtypes.bfloat16, (3, 3, 3)), "small": np.ones(1)},
        "exact": random_array(rng, np.int32, (chunk_bytes // 4,)),
    }
    path = tmp_path / "chunked.msgpack"
    write_msgpack(tree, path)
    data = path.read_bytes()
    assert data == serialization.to_bytes(tree)
    raw = msgpack.unpackb(data, raw=False, ext_hook=lambda code, payload: code)
    assert raw["big"]["__msgpack_chunked_array__"] is True
    assert_same(read_msgpack(path), serialization.msgpack_restore(data))
    assert_same(read_msgpack(path), tree)


def test_msgpack_flatten_matches_flax_traverse_util():
    tree = random_tree(np.random.default_rng(3))
    tree["empty"] = {}
    flat = flatten(tree)
    assert list(flat) == list(traverse_util.flatten_dict(tree, sep="/"))
    assert_same(unflatten(flat), traverse_util.unflatten_dict(flat, sep="/"))


def test_msgpack_flatten_names_non_array_leaf():
    with pytest.raises(CheckpointError, match=r"'model/step' is a str, expected an array"):
        flatten({"model": {"w": np.ones(2), "step": "x"}}, source="f.msgpack")
    with pytest.raises(CheckpointError, match=r"'a' is a tensor and also a prefix"):
        unflatten({"a": np.ones(1), "a/b": np.ones(1)})


def _hf_flax_save(params, folder, max_shard_size):
    """HF modeling_flax_utils: flax_shard_checkpoint + save_pretrained, on flax's own helpers."""
    blocks, block, block_size, total = [], {}, 0, 0
    weights = traverse_util.flatten_dict(params, sep="/")
    for key, value in weights.items():
        size = value.size * value.dtype.itemsize
        if block_size + size > max_shard_size:
            blocks.append(block)
            block, block_size = {}, 0
        block[key] = value
        block_size += size
        total += size
    blocks.append(block)
    folder.mkdir()
    if len(blocks) == 1:
        (folder / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
        return
    weight_map = {}
    for i, shard in enumerate(blocks):
        name = f"flax_model-{i + 1:05d}-of-{len(blocks):05d}.msgpack"
        shard_bytes = serialization.to_bytes(traverse_util.unflatten_dict(shard, sep="/"))
        (folder / name).write_bytes(shard_bytes)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (folder / "flax_model.msgpack.index.json").write_text(index_text)


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("max_shard_size", [10, 60, 200, 10**9])
def test_msgpack_sharded_matches_hf(tmp_path, max_shard_size):
    rng = np.random.default_rng(max_shard_size)
    tree = {
        "model": {
            "decoder": {
                "embed_tokens": {"embedding": random_array(rng, np.float32, (6, 4))},
                "layers": {str(i): {"fc1": {"kernel": random_array(rng, np.float16, (4, 5))}} for i in range(3)},
            }
        },
        "lm_head": {"kernel": random_array(rng, ml_dtypes.bfloat16, (4, 6))},
    }
    _hf_flax_save(tree, tmp_path / "hf", max_shard_size)
    written = write_names(tree, tmp_path / "ours", max_shard_size)
    assert _folder_bytes(tmp_path / "ours") == _folder_bytes(tmp_path / "hf")
    assert sorted(written) == sorted(_folder_bytes(tmp_path / "hf"))
    if max_shard_size == 10:  # first tensor over the limit: HF leaves an empty first shard
        assert (tmp_path / "ours" / written[0]).read_bytes() == serialization.to_bytes({})
    index = tmp_path / "ours" / "flax_model.msgpack.index.json"
    restored = read_msgpack_sharded(index) if index.exists() else read_msgpack(tmp_path / "ours" / "flax_model.msgpack")
    assert_same(flatten(restored), flatten(tree))


def test_msgpack_sharded_replaces_stale_files(tmp_path):
    tree = {"a": np.ones(8, np.float32), "b": np.ones(8, np.float32)}
    write_names(tree, tmp_path, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flax_model-00001-of-00002.msgpack",
        "flax_model-00002-of-00002.msgpack",
        "flax_model.msgpack.index.json",
    ]
    (tmp_path / "config.json").write_text("{}")
    assert write_names(tree, tmp_path, 10**6) == ["flax_model.msgpack"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "flax_model.msgpack"]


def _valid_msgpack(tmp_path):
    path = tmp_path / "good.msgpack"
    write_msgpack({"model": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}}, path)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 1, 5, 20, -10, -1])
def test_msgpack_truncated_names_file(tmp_path, cut):
    path = tmp_path / "truncated.msgpack"
    path.write_bytes(_valid_msgpack(tmp_path)[:cut])
    with pytest.raises(CheckpointError, match=r"truncated.msgpack"):
        read_msgpack(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1\xc1\xc1", "not a valid Flax msgpack"),
        (b"\x93\x01\x02\x03", "top level is a list"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "git-lfs pointer"),
        (msgpack.packb({"m": {"w": msgpack.ExtType(9, b"?")}}), r"unknown .*ext type 9 .*'m/w'"),
        (msgpack.packb({"w": msgpack.ExtType(1, b"\x01")}), r"malformed array .*'w'"),
        (
            msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb(((2,), "float32", b"\0" * 3)))}),
            r"malformed array .*'w'",
        ),
        (msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb(((1,), "nope", b"\0")))}), "nope"),
        (msgpack.packb({"w": {"__msgpack_chunked_array__": True}}), "malformed chunked array"),
    ],
)
def test_msgpack_corrupt_names_file_and_problem(tmp_path, payload, message):
    path = tmp_path / "corrupt.msgpack"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"corrupt.msgpack") as info:
        read_msgpack(path)
    assert info.match(message)


def test_msgpack_missing_and_sharded_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing.msgpack: file not found"):
        read_msgpack(tmp_path / "nothing.msgpack")
    tree = {"a": np.ones(8, np.float32), "b": {"c": np.ones(8, np.float32)}}
    write_names(tree, tmp_path / "s", 40)
    index = tmp_path / "s" / "flax_model.msgpack.index.json"
    shard2 = tmp_path / "s" / "flax_model-00002-of-00002.msgpack"
    write_msgpack({"b": {}}, shard2)
    with pytest.raises(CheckpointError, match=r"00002-of-00002.msgpack: lacks .*'b/c'"):
        read_msgpack_sharded(index)
    shard2.unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00002.msgpack: file not found"):
        read_msgpack_sharded(index)
    write_msgpack({"b": {"c": "not an array"}}, shard2)
    with pytest.raises(CheckpointError, match=r"'b/c' is a str"):
        read_msgpack_sharded(index)
    index.write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"index.json: not a valid JSON index"):
        read_msgpack_sharded(index)
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"no 'weight_map'"):
        read_msgpack_sharded(index)


# --------------------------------------------------------------------------------------------------
# keras h5


def opt_like_weights(rng, num_layers=2, dtype=np.float32):
    """Keys as HF's TFOPTForCausalLM names them, without the instance name."""
    weights = {
        "model/decoder/embed_tokens/weight:0": random_array(rng, dtype, (10, 4)),
        "model/decoder/embed_positions/embeddings:0": random_array(rng, dtype, (8, 4)),
    }
    for i in range(num_layers):
        for proj in ("q_proj", "k_proj"):
            prefix = f"model/decoder/layers.{i}/self_attn/{proj}"
            weights[f"{prefix}/kernel:0"] = random_array(rng, dtype, (4, 4))
            weights[f"{prefix}/bias:0"] = random_array(rng, dtype, (4,))
    return weights


def h5_structure(path):
    """Every object's kind, attributes (with their HDF5 string storage), shape and dtype."""

    def attrs(obj):
        out = {}
        for name in obj.attrs:
            attr = obj.attrs.get_id(name)
            kind = attr.get_type()
            is_vlen = kind.is_variable_str() if isinstance(kind, h5py.h5t.TypeStringID) else None
            out[name] = (attr.shape, str(attr.dtype), is_vlen, repr(obj.attrs[name]))
        return out

    with h5py.File(path, "r") as f:
        items = [("/", "Group", attrs(f))]

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                items.append((name, "Dataset", attrs(obj), obj.shape, str(obj.dtype), obj.chunks))
            else:
                items.append((name, "Group", attrs(obj)))

        f.visititems(visit)
    return items


def hf_load_tf_weights_from_h5(path, layer_names_of_model):
    """HF's load_tf_weights_from_h5 reading steps (layer groups, weight_names, strip instance)."""
    loaded = {}
    with h5py.File(path, "r") as f:
        saved = set(keras_h5.load_attributes(f, "layer_names"))
        for layer in layer_names_of_model:
            if layer in saved:
                group = f[layer]
                for weight_name in keras_h5.load_attributes(group, "weight_names"):
                    loaded["/".join(weight_name.split("/")[1:])] = np.asarray(group[weight_name])
    return loaded


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_h5_round_trip_bit_exact(tmp_path, dtype):
    weights = opt_like_weights(np.random.default_rng(0), dtype=dtype)
    weights["model/decoder/step:0"] = np.array(3, dtype=np.int32)  # a scalar variable
    path = tmp_path / "tf_model.h5"
    write_h5(weights, path, INSTANCE)
    restored = read_h5(path)
    assert restored.instance_name == INSTANCE
    assert_same(dict(restored), weights)
    assert_same(hf_load_tf_weights_from_h5(path, ["model"]), weights)


def test_h5_exact_layout(tmp_path):
    weights = {
        "model/decoder/final_layer_norm/gamma:0": np.ones(4, np.float32),
        "model/decoder/embed_tokens/weight:0": np.zeros((6, 4), np.float16),
        "lm_head/kernel:0": np.zeros((4, 6), np.float32),
    }
    path = tmp_path / "tf_model.h5"
    write_h5(weights, path, "tfopt_for_causal_lm_1")
    with h5py.File(path, "r") as f:
        assert list(f.attrs["layer_names"]) == ["model", "lm_head"]  # first-seen order
        assert f.attrs["backend"] == "tensorflow"
        assert f.attrs["keras_version"] == keras_h5.KERAS_VERSION
        assert list(f) == ["lm_head", "model", "top_level_model_weights"]
        assert list(f["model"].attrs["weight_names"]) == [
            "tfopt_for_causal_lm_1/model/decoder/final_layer_norm/gamma:0",
            "tfopt_for_causal_lm_1/model/decoder/embed_tokens/weight:0",
        ]
        dataset = f["model/tfopt_for_causal_lm_1/model/decoder/embed_tokens/weight:0"]
        assert (dataset.shape, dataset.dtype, dataset.chunks) == ((6, 4), np.float16, None)
        head_names = list(f["lm_head"].attrs["weight_names"])
        assert head_names == ["tfopt_for_causal_lm_1/lm_head/kernel:0"]
        assert f["top_level_model_weights"].attrs["weight_names"].shape == (0,)
    assert read_h5(path).instance_name == "tfopt_for_causal_lm_1"


def test_h5_chunked_weight_names(tmp_path):
    rng = np.random.default_rng(1)
    # Long names so that a few hundred of them pass Keras' 64512-byte attribute limit.
    weights = {
        f"model/decoder/layers.{i}/{'self_attn/' * 20}kernel:0": random_array(rng, np.float32, (1,)) for i in range(320)
    }
    path = tmp_path / "tf_model.h5"
    write_h5(weights, path, INSTANCE)
    full_names = [f"{INSTANCE}/{name}" for name in weights]
    longest = max(len(name) for name in full_names)
    with h5py.File(path, "r") as f:
        group = f["model"]
        assert "weight_names" not in group.attrs
        chunks = [group.attrs[f"weight_names{i}"] for i in range(len(group.attrs))]
        assert all(chunk.dtype == f"S{longest}" for chunk in chunks)
        assert all(chunk.nbytes <= keras_h5.HDF5_OBJECT_HEADER_LIMIT for chunk in chunks)
        assert len(chunks) == -(-len(full_names) * longest // keras_h5.HDF5_OBJECT_HEADER_LIMIT)
        assert [n.decode() for chunk in chunks for n in chunk] == full_names
    assert_same(dict(read_h5(path)), weights)
    assert_same(hf_load_tf_weights_from_h5(path, ["model"]), weights)


def test_h5_matches_tf_keras_saver(tmp_path, monkeypatch):
    """tf-keras' own save_weights on a model named like HF's gives our file, byte for byte."""
    tf_keras = pytest.importorskip("tf_keras")
    tf = pytest.importorskip("tensorflow")
    from tf_keras.src.saving.legacy import hdf5_format

    monkeypatch.setattr(keras_h5, "KERAS_VERSION", tf_keras.__version__)

    class Decoder(tf_keras.layers.Layer):
        def build(self, input_shape=None):
            self.built = True
            with tf.name_scope("embed_tokens"):
                self.add_weight(name="weight", shape=(5, 4))
            with tf.name_scope("layers.0"), tf.name_scope("fc1"):
                self.add_weight(name="kernel", shape=(4, 6))
                self.add_weight(name="bias", shape=(6,), dtype="float16")

    class Main(tf_keras.layers.Layer):
        def build(self, input_shape=None):
            self.built = True
            self.decoder = Decoder(name="decoder")
            with tf.name_scope("decoder"):
                self.decoder.build(None)

    class Model(tf_keras.Model):
        def build(self, input_shape=None):
            self.built = True
            self.model = Main(name="model")
            with tf.name_scope("model"):
                self.model.build(None)

    model = Model(name=INSTANCE)
    with tf.name_scope(model.name):
        model.build(None)
    rng = np.random.default_rng(2)
    for variable in model.weights:
        variable.assign(rng.standard_normal(variable.shape).astype(variable.dtype.as_numpy_dtype))
    reference = tmp_path / "keras.h5"
    model.save_weights(str(reference))

    restored = read_h5(reference)
    assert restored.instance_name == INSTANCE
    expected = {"/".join(v.name.split("/")[1:]): v.numpy() for v in model.weights}
    assert_same(dict(restored), expected)
    ours = tmp_path / "ours.h5"
    write_h5(restored, ours, restored.instance_name)
    assert h5_structure(ours) == h5_structure(reference)
    assert ours.read_bytes() == reference.read_bytes()

    names = [f"{INSTANCE}/model/decoder/layers.{i}/fc1/kernel:0".encode() for i in range(2000)]
    savers = {
        "keras_attrs.h5": hdf5_format.save_attributes_to_hdf5_group,
        "our_attrs.h5": keras_h5.save_attributes,
    }
    for name, save in savers.items():
        with h5py.File(tmp_path / name, "w") as f:
            save(f, "weight_names", names)
    assert h5_structure(tmp_path / "our_attrs.h5") == h5_structure(tmp_path / "keras_attrs.h5")


def hf_load_tf_shards(folder):
    """HF's load_tf_sharded_weights reading steps: shards from the index, root layer_names."""
    index = json.loads((folder / "tf_model.h5.index.json").read_text())
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        with h5py.File(folder / shard, "r") as f:
            for name in keras_h5.load_attributes(f, "layer_names"):
                loaded[name] = np.asarray(f[name])
    return index, loaded


@pytest.mark.parametrize("max_shard_size", [100, 300])
def test_h5_sharded_layout_and_round_trip(tmp_path, max_shard_size):
    weights = opt_like_weights(np.random.default_rng(4))
    written = write_names(weights, tmp_path, max_shard_size, fmt="tf")
    count = len(written) - 1
    assert written[-1] == "tf_model.h5.index.json"
    assert written[:-1] == [f"tf_model-{i:05d}-of-{count:05d}.h5" for i in range(1, count + 1)]
    index, loaded = hf_load_tf_shards(tmp_path)
    assert_same(dict(sorted(loaded.items())), dict(sorted(weights.items())))
    sizes = [v.nbytes for v in weights.values()]
    assert index["metadata"] == {"total_size": sum(sizes)}
    assert set(index["weight_map"]) == {f"{INSTANCE}/{name}" for name in weights}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert (tmp_path / "tf_model.h5.index.json").read_text() == text
    for shard in written[:-1]:
        with h5py.File(tmp_path / shard, "r") as f:
            assert list(f.attrs) == ["layer_names"]
            members = sorted(k for k, v in index["weight_map"].items() if v == shard)
            assert list(f.attrs["layer_names"]) == [m.split("/", 1)[1] for m in members]
            shard_bytes = sum(f[n].nbytes for n in f.attrs["layer_names"])
            assert shard_bytes <= max_shard_size or len(members) == 1  # HF: big tensors alone
    restored = read_h5_sharded(tmp_path / "tf_model.h5.index.json")
    assert restored.instance_name == INSTANCE
    assert_same(dict(sorted(restored.items())), dict(sorted(weights.items())))


def test_h5_sharded_single_file_and_model_dot_names(tmp_path):
    weights = {"model.shared/weight:0": np.ones((3, 2), np.float32), "x/bias:0": np.zeros(7)}
    write_names(weights, tmp_path, 30, fmt="tf")
    with h5py.File(tmp_path / "tf_model-00001-of-00002.h5", "r") as f:
        # HF keeps the whole name (instance included) when it contains "model."
        assert list(f.attrs["layer_names"]) == [f"{INSTANCE}/model.shared/weight:0"]
    assert_same(dict(read_h5_sharded(tmp_path / "tf_model.h5.index.json")), weights)
    assert write_names(weights, tmp_path, 10**6, fmt="tf") == ["tf_model.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tf_model.h5"]
    assert_same(dict(read_h5(tmp_path / "tf_model.h5")), weights)


def test_h5_sharded_missing_weight(tmp_path):
    weights = opt_like_weights(np.random.default_rng(5), num_layers=1)
    first, second, *_ = write_names(weights, tmp_path, 100, fmt="tf")
    index = tmp_path / "tf_model.h5.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][f"{INSTANCE}/model/ghost:0"] = first
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"in no shard: .*ghost"):
        read_h5_sharded(index)
    (tmp_path / second).write_bytes(b"\x89HDF\r\n")
    with pytest.raises(CheckpointError, match=rf"{second}: not a readable HDF5"):
        read_h5_sharded(index)


def _valid_h5(tmp_path):
    path = tmp_path / "good.h5"
    write_h5(opt_like_weights(np.random.default_rng(6)), path, INSTANCE)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 7, 100, 2000, 0.5, -1])
def test_h5_truncated_names_file(tmp_path, cut):
    data = _valid_h5(tmp_path)
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(CheckpointError, match=r"truncated.h5: not a readable HDF5 file"):
        read_h5(path)


def test_h5_not_hdf5_and_missing(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    with pytest.raises(CheckpointError, match=r"junk.h5: not a readable HDF5 file"):
        read_h5(path)
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match=r"junk.h5: is a git-lfs pointer"):
        read_h5(path)
    with pytest.raises(CheckpointError, match=r"absent.h5: file not found"):
        read_h5(tmp_path / "absent.h5")


HOSTILE_MSGPACK = {
    "array_of_4G_elements": b"\xdd\xff\xff\xff\xff",
    "map_of_4G_entries": b"\xdf\xff\xff\xff\xff",
    "bin_of_4GB": b"\x81\xa1a\xc6\xff\xff\xff\xff" + b"x" * 10,
    "ext_of_4GB": b"\x81\xa1a\xc9\xff\xff\xff\xff\x01",
    "nested_200000_deep": b"\x81\xa1a" * 200_000,
}


@pytest.mark.parametrize("case", list(HOSTILE_MSGPACK))
def test_msgpack_huge_declared_lengths_are_refused(tmp_path, case):
    import psutil

    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(HOSTILE_MSGPACK[case])
    before = psutil.Process().memory_info().rss
    with pytest.raises(CheckpointError, match="flax_model.msgpack: not a valid Flax msgpack checkpoint"):
        read_msgpack(path)
    assert psutil.Process().memory_info().rss - before < 2**26  # nothing allocated for the declared lengths


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch", "tf", "flax"])
@pytest.mark.parametrize("shard", ["../outside.bin", "/etc/passwd", "sub/../../x", ".."])
def test_an_index_naming_a_file_outside_the_folder_is_refused(tmp_path, fmt, shard):
    from opt_core.formats import FORMATS, read_checkpoint

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"secret")
    index = folder / FORMATS[fmt].index_name
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match="is not a file name in the folder"):
        read_checkpoint(folder)


HOSTILE_H5 = ["external_storage", "virtual_dataset", "external_link", "soft_link", "larger_than_the_file"]


def _make_hostile_h5(path, secret, kind):
    """A Keras h5 file whose one weight is made to read `secret` (another file of the machine) or too much."""
    with h5py.File(path, "w") as f:
        keras_h5.save_attributes(f, "layer_names", [b"model"])
        group = f.create_group("model")
        keras_h5.save_attributes(group, "weight_names", [b"inst/w:0"])
        inner = group.create_group("inst")
        if kind == "external_storage":
            inner.create_dataset("w:0", (4,), np.float32, external=[(str(secret), 0, 16)])
        elif kind == "virtual_dataset":
            layout = h5py.VirtualLayout((4,), np.float32)
            layout[:] = h5py.VirtualSource(str(secret), "data", shape=(4,))
            inner.create_virtual_dataset("w:0", layout)
        elif kind == "external_link":
            inner["w:0"] = h5py.ExternalLink(str(secret), "data")
        elif kind == "soft_link":
            f["elsewhere"] = np.arange(4, dtype=np.float32)
            inner["w:0"] = h5py.SoftLink("/elsewhere")
        else:  # a dataset that declares far more elements than the file holds bytes (no storage allocated)
            inner.create_dataset("w:0", (10**9,), np.float32)


@pytest.mark.parametrize("kind", HOSTILE_H5)
def test_h5_never_reads_outside_its_file(tmp_path, kind):
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["data"] = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    (tmp_path / "secret.raw").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = tmp_path / "tf_model.h5"
    _make_hostile_h5(path, tmp_path / ("secret.raw" if kind == "external_storage" else "secret.h5"), kind)
    with pytest.raises(CheckpointError, match=r"tf_model.h5: .*'inst/w:0' (is reached through|stores its data|claims)"):
        read_h5(path)


def test_h5_not_keras_layout(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["vars/0"] = np.ones(3)  # roughly a Keras 3 .weights.h5
    with pytest.raises(CheckpointError, match=r"plain.h5: not a Keras weights file .*'layer_names'"):
        read_h5(path)
    with h5py.File(path, "w") as f:
        keras_h5.save_attributes(f, "layer_names", [b"model"])
        f.create_group("model")
    with pytest.raises(CheckpointError, match=r"not a Keras weights file .*'model/weight_names'"):
        read_h5(path)
    with h5py.File(path, "w") as f:
        keras_h5.save_attributes(f, "layer_names", [b"model"])
        keras_h5.save_attributes(f.create_group("model"), "weight_names", [b"inst/model/w:0"])
    with pytest.raises(CheckpointError, match=r"'inst/model/w:0' has no dataset"):
        read_h5(path)
    with h5py.File(path, "w") as f:
        keras_h5.save_attributes(f, "layer_names", [b"model", b"head"])
        keras_h5.save_attributes(f.create_group("model"), "weight_names", [])
    with pytest.raises(CheckpointError, match=r"layer 'head' is listed but has no group"):
        read_h5(path)


def test_h5_write_rejects_unstorable(tmp_path):
    path = tmp_path / "bad.h5"
    with pytest.raises(CheckpointError, match=r"bfloat16 has no native HDF5 type"):
        write_h5({"model/w:0": np.ones(2, ml_dtypes.bfloat16)}, path, INSTANCE)
    with pytest.raises(CheckpointError, match=r"instance name"):
        write_h5({"model/w:0": np.ones(2)}, path, "a/b")
    with pytest.raises(CheckpointError, match=r"prefix"):
        write_h5({"model/w": np.ones(2), "model/w/x": np.ones(2)}, path, INSTANCE)
    assert not path.exists()
