"""Tests of `opt_core.torch_pickle`, the torch-free reader and writer of `torch.save` checkpoints.

torch is the oracle: files it writes (zip and legacy formats) must read back bit-exact, files we
write must load in `torch.load(weights_only=True)` and HF transformers, malicious pickles must be
refused without running anything, and damaged files must fail with a `CheckpointError` naming the
file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np
import pytest

from opt_core import torch_pickle
from opt_core.errors import CheckpointError, UnsafeCheckpointError
from opt_core.torch_pickle import PickledObject, load_objects, load_state_dict, save_state_dict

torch = pytest.importorskip("torch")

NUMPY_OF = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype(np.float64),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}
FORMATS = {"zip": True, "legacy": False}  # name -> torch.save's _use_new_zipfile_serialization


def sample(dtype: torch.dtype, shape=(3, 4), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(dtype)


def assert_bit_exact(array: np.ndarray, tensor: torch.Tensor) -> None:
    assert isinstance(array, np.ndarray)
    assert array.shape == tuple(tensor.shape)
    assert array.dtype == NUMPY_OF[tensor.dtype]
    expected = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert np.ascontiguousarray(array).tobytes() == expected


def every_dtype() -> dict[str, torch.Tensor]:
    tensors = {f"t_{str(d)[6:]}": sample(d, seed=i) for i, d in enumerate(NUMPY_OF)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 3)
    return tensors


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_every_dtype(tmp_path: Path, fmt: str) -> None:
    tensors = every_dtype()
    path = tmp_path / "model.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=FORMATS[fmt])
    loaded = load_state_dict(path)
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert_bit_exact(loaded[name], tensor)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_dtypes_saved_as_untyped_storage(tmp_path: Path, fmt: str) -> None:
    # Dtypes newer than torch's storage classes go through UntypedStorage + _rebuild_tensor_v3.
    tensors = {
        "u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
        "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "new_dtypes.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=FORMATS[fmt])
    loaded = load_state_dict(path)
    assert loaded["u16"].dtype == np.uint16 and loaded["u16"].tolist() == [1, 2, 65535]
    assert loaded["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert loaded["f8"].astype(np.float32).tolist() == [0.5, -2.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_views_offsets_and_shared_storage(tmp_path: Path, fmt: str) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    embed = sample(torch.bfloat16, (5, 4))
    tensors = {
        "base": base,
        "rows": base[1:3],  # storage offset
        "row": base[2],
        "column": base[:, 2],  # strided
        "transposed": base.t(),
        "stepped": base[::2, ::3],
        "expanded": torch.ones(3, 1).expand(3, 4),  # stride 0
        "embed": embed,
        "lm_head": embed,  # tied weights: one storage, two names
    }
    path = tmp_path / "views.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=FORMATS[fmt])
    loaded = load_state_dict(path)
    for name, tensor in tensors.items():
        assert_bit_exact(loaded[name], tensor)
    # Contiguous tensors are read-only views of the mapped file; tied ones view the same bytes.
    assert not loaded["base"].flags.writeable
    assert np.shares_memory(loaded["embed"], loaded["lm_head"])
    assert np.shares_memory(loaded["base"], loaded["rows"])


def test_reads_hf_state_dict_and_parameters(tmp_path: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
        max_position_embeddings=20,
    )  # fmt: skip
    state = OPTForCausalLM(config).state_dict()  # an OrderedDict carrying `_metadata`
    assert isinstance(state, OrderedDict) and hasattr(state, "_metadata")
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert_bit_exact(loaded[name], tensor)

    parameters = {"weight": torch.nn.Parameter(sample(torch.float16))}  # _rebuild_parameter
    torch.save(parameters, path)
    assert_bit_exact(load_state_dict(path)["weight"], parameters["weight"])


def test_reads_big_endian_archives(tmp_path: Path) -> None:
    tensors = {"a": sample(torch.float32, (3, 4)), "b": sample(torch.float32, (2,), seed=1)}
    tensors["t"] = tensors["a"].t()
    little, big = tmp_path / "little.bin", tmp_path / "big.bin"
    torch.save(tensors, little)
    with zipfile.ZipFile(little) as source, zipfile.ZipFile(big, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            target.writestr(info.filename, data)
    loaded = load_state_dict(big)
    reference = torch.load(big, weights_only=True)
    for name, tensor in tensors.items():
        assert_bit_exact(loaded[name], tensor)
        assert_bit_exact(loaded[name], reference[name])


def test_reads_compressed_archives(tmp_path: Path) -> None:
    # torch never compresses, but a re-zipped file should still read (from memory, not mapped).
    tensors = {"a": sample(torch.float16), "b": sample(torch.int64, (5,))}
    stored, deflated = tmp_path / "stored.bin", tmp_path / "deflated.bin"
    torch.save(tensors, stored)
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(deflated, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED)
    loaded = load_state_dict(deflated)
    for name, tensor in tensors.items():
        assert_bit_exact(loaded[name], tensor)


@pytest.mark.parametrize("entry", ["data.pkl", "data/0"])
def test_a_zip_bomb_is_refused_before_it_expands(tmp_path: Path, entry: str) -> None:
    """A ~256 kB entry that inflates to 256 MiB: refused from its declared size, before any decompression."""
    import psutil

    stored, bomb = tmp_path / "stored.bin", tmp_path / "bomb.bin"
    torch.save({"a": sample(torch.float32)}, stored)
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(bomb, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(entry):
                data += bytes(2**28)  # zeros deflate about 1000:1
            target.writestr(info.filename, data, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 2**20
    before = psutil.Process().memory_info().rss
    with pytest.raises(CheckpointError, match=rf"{entry} would expand to \d+ bytes .*zip bomb"):
        load_state_dict(bomb)
    assert psutil.Process().memory_info().rss - before < 2**26


def numpy_tensors() -> dict[str, np.ndarray]:
    arrays = {name: tensor_to_numpy(tensor) for name, tensor in every_dtype().items()}
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays["transposed"] = base.T  # non-contiguous input
    arrays["stepped"] = base[::2, 1::2]
    arrays["big_endian"] = base.astype(">f4")
    return arrays


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def test_writer_loads_in_torch_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_pickle, "_CHUNK", 7)  # stream tensors in many odd-sized pieces
    arrays = numpy_tensors()
    path = tmp_path / "ours.bin"
    save_state_dict(arrays, path)
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert isinstance(loaded, OrderedDict) and list(loaded) == list(arrays)
        for name, array in arrays.items():
            expected = array.astype(array.dtype.newbyteorder("=")) if array.dtype.kind != "V" else array
            assert_bit_exact(expected, loaded[name])
    ours = load_state_dict(path)
    assert list(ours) == list(arrays)
    for name, array in arrays.items():
        native = array.astype(ours[name].dtype)  # the reader returns native byte order
        assert ours[name].shape == array.shape
        assert ours[name].tobytes() == np.ascontiguousarray(native).tobytes()


def test_writer_layout_matches_torch_save(tmp_path: Path) -> None:
    path = tmp_path / "ours.bin"
    save_state_dict({"a": np.ones((3, 5), np.float16), "b": np.zeros(7, np.int8)}, path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        assert archive.read("archive/byteorder") == b"little"
        assert archive.read("archive/version") == b"3\n"
        names = archive.namelist()
        assert names[0] == "archive/data.pkl" and {"archive/data/0", "archive/data/1"} < set(names)
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            name_length, extra_length = np.frombuffer(raw, "<u2", 2, info.header_offset + 26)
            assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0


def test_hf_transformers_loads_our_pytorch_model_bin(tmp_path: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
        max_position_embeddings=20,
    )  # fmt: skip
    original = OPTForCausalLM(config)
    config.save_pretrained(tmp_path)
    state = {k: v.numpy() for k, v in original.state_dict().items() if k != "lm_head.weight"}
    save_state_dict(state, tmp_path / "pytorch_model.bin")
    reloaded = OPTForCausalLM.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original.state_dict()[name]), name


@pytest.mark.parametrize("bad", [{"c": np.ones(2, np.complex64)}, {"o": np.array([None])}, {1: np.ones(2)}])
def test_writer_rejects_unsupported_tensors(tmp_path: Path, bad: dict) -> None:
    path = tmp_path / "bad.bin"
    with pytest.raises(CheckpointError, match="cannot write tensor"):
        save_state_dict(bad, path)
    assert not path.exists()


# --- malicious pickles ---


class SystemCall:
    """Unpickling this with the standard pickle would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def touch(path: str) -> None:
    Path(path).touch()


class Sneaky:
    """Reduces to a call of an ordinary function of this module, which creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (touch, (self.path,))


def write_malicious(path: Path, payload: object, how: str) -> None:
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        obj = {"weight": torch.ones(2), "payload": payload}
        torch.save(obj, path, _use_new_zipfile_serialization=how == "zip")


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("kind", ["os.system", "eval"])
@pytest.mark.parametrize("loader", [load_state_dict, load_objects])
def test_malicious_pickles_are_refused_without_running(tmp_path: Path, how, kind, loader) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = SystemCall(command) if kind == "os.system" else Eval(f"__import__('os').system({command!r})")
    global_name = f"{os.system.__module__}.system" if kind == "os.system" else "builtins.eval"
    path = tmp_path / "evil.bin"
    write_malicious(path, payload, how)
    with pytest.raises(UnsafeCheckpointError) as raised:
        loader(path)
    assert str(path) in str(raised.value) and global_name in str(raised.value)
    assert not marker.exists()


def test_state_dict_refuses_any_other_global(tmp_path: Path) -> None:
    path = tmp_path / "namespace.bin"
    torch.save({"weight": torch.ones(2), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace") as raised:
        load_state_dict(path)
    assert str(path) in str(raised.value)


def test_objects_never_calls_unknown_globals(tmp_path: Path) -> None:
    marker = tmp_path / "called"
    path = tmp_path / "sneaky.bin"
    torch.save({"hook": Sneaky(str(marker))}, path)
    hook = load_objects(path)["hook"]
    assert isinstance(hook, PickledObject)
    assert (hook.module, hook.name, hook.args) == (touch.__module__, "touch", (str(marker),))
    assert not marker.exists()


# --- arbitrary objects (metaseq checkpoints) ---


def metaseq_like() -> dict:
    return {
        "model": {"decoder.embed_tokens.weight": sample(torch.float16, (5, 4))},
        "cfg": {
            "model": {"_name": "transformer_lm", "decoder_layers": 2},
            "common": {"fp16": True},
        },
        "args": argparse.Namespace(arch="transformer_lm_gpt", decoder_layers=2, lr=[1e-4]),
        "optimizer_history": [
            {
                "criterion_name": "CrossEntropyCriterion",
                "lr_scheduler_state": {"best": None},
                "num_updates": 3,
            }
        ],
        "extra_state": {"epoch": 1, "rng": np.arange(3), "loss": np.float32(2.5)},
        "dtype": torch.float16,
        "device": torch.device("cuda", 1),
        "size": torch.Size([2, 3]),
        "blob": b"\x00\xff",
        "tags": {"a", "b"},
        "pair": (1, "x"),
        "ordered": OrderedDict(a=1),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "data_dir": PurePosixPath("/data/opt"),
        "extra": types.SimpleNamespace(seed=1),
    }


@pytest.mark.parametrize("protocol", [1, 2, 4])
@pytest.mark.parametrize("fmt", FORMATS)
def test_load_objects_reads_metaseq_like_checkpoints(tmp_path: Path, fmt: str, protocol: int) -> None:
    original = metaseq_like()
    path = tmp_path / "checkpoint_last.pt"
    torch.save(original, path, _use_new_zipfile_serialization=FORMATS[fmt], pickle_protocol=protocol)
    loaded = load_objects(path)
    weight = original["model"]["decoder.embed_tokens.weight"]
    assert_bit_exact(loaded["model"]["decoder.embed_tokens.weight"], weight)
    for key in ("cfg", "optimizer_history", "blob", "tags", "pair", "ordered"):
        assert loaded[key] == original[key], key
    args = loaded["args"]
    assert isinstance(args, PickledObject) and not isinstance(args, argparse.Namespace)
    assert (args.module, args.name, args.state) == ("argparse", "Namespace", vars(original["args"]))
    assert loaded["extra_state"]["epoch"] == 1
    np.testing.assert_array_equal(loaded["extra_state"]["rng"], np.arange(3))
    assert loaded["extra_state"]["loss"] == np.float32(2.5)
    assert (loaded["dtype"], loaded["device"], loaded["size"]) == (
        "torch.float16",
        "cuda:1",
        (2, 3),
    )
    assert_bit_exact(loaded["parameter"], original["parameter"])
    path_placeholder, namespace = loaded["data_dir"], loaded["extra"]
    assert (path_placeholder.name, path_placeholder.args) == ("PurePosixPath", ("/", "data", "opt"))
    assert (namespace.module, namespace.name, namespace.state) == (
        "types",
        "SimpleNamespace",
        {"seed": 1},
    )


def test_state_dict_rejects_nested_objects(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a flat state dict") as raised:
        load_state_dict(path)
    assert str(path) in str(raised.value)


# --- damaged files ---


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_files(tmp_path: Path, fmt: str, keep: float) -> None:
    path = tmp_path / "cut.bin"
    torch.save(every_dtype(), path, _use_new_zipfile_serialization=FORMATS[fmt])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    for loader in (load_state_dict, load_objects):
        with pytest.raises(CheckpointError) as raised:
            loader(path)
        assert str(path) in str(raised.value)
        assert not isinstance(raised.value, UnsafeCheckpointError)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"\x00garbage\xff" * 20, "not a PyTorch checkpoint"),
        (b"PK\x03\x04" + bytes(200), "zip"),
        (pickle.dumps({"a": 1}, protocol=2), "magic number"),
        (b"\x80\x02K", "pickle"),
    ],
)
def test_non_checkpoints(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "not_a_checkpoint.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as raised:
        load_state_dict(path)
    assert str(path) in str(raised.value)


def test_missing_file_and_zip_without_data_pkl(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.bin"):
        load_state_dict(tmp_path / "missing.bin")
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("folder/readme.txt", "hello")
    with pytest.raises(CheckpointError, match="data.pkl") as raised:
        load_objects(path)
    assert str(path) in str(raised.value)


def archive_with_pickle(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
    return path


BUILD_ON_FUNCTION = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__)sb."
SLOTS_ON_FUNCTION = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x03\x00\x00\x00_fnK\x01s\x86b."
SLOTS_ON_PLACEHOLDER = b"\x80\x02cargparse\nNamespace\nN}X\x07\x00\x00\x00__new__K\x01s\x86b."
HUGE_BYTES = b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R."


@pytest.mark.parametrize(
    "data_pkl, loaders",
    [
        (BUILD_ON_FUNCTION, [load_state_dict, load_objects]),
        (SLOTS_ON_FUNCTION, [load_state_dict, load_objects]),
        (SLOTS_ON_PLACEHOLDER, [load_objects]),
        (HUGE_BYTES, [load_objects]),
    ],
    ids=["build-function", "slots-function", "slots-placeholder", "huge-bytes"],
)
def test_pickles_cannot_mutate_the_reader(tmp_path: Path, data_pkl: bytes, loaders) -> None:
    path = archive_with_pickle(tmp_path / "crafted.bin", data_pkl)
    for loader in loaders:
        with pytest.raises(CheckpointError) as raised:
            loader(path)
        assert str(path) in str(raised.value)
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2, 3)[:, 1]}, good)  # the rebuild functions still behave
    assert_bit_exact(load_state_dict(good)["w"], torch.ones(2))


class Oversized:
    """A tensor whose size claims more elements than its storage holds."""

    def __init__(self, storage) -> None:
        self.storage = storage

    def __reduce__(self):
        args = (self.storage, 2, (100,), (1,), False, OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


@pytest.mark.parametrize("fmt", FORMATS)
def test_out_of_bounds_tensor_is_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "oversized.bin"
    storage = torch.ones(4).untyped_storage()
    torch.save({"w": Oversized(storage)}, path, _use_new_zipfile_serialization=FORMATS[fmt])
    with pytest.raises(CheckpointError, match="past the end") as raised:
        load_state_dict(path)
    assert str(path) in str(raised.value)


def test_module_imports_no_framework() -> None:
    code = (
        "import sys, opt_core.torch_pickle; "
        "bad = [m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
