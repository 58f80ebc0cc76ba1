"""Named hostile files the fuzzer's issue lists, beyond each reader's own tests: pickles built to exhaust memory or
the stack, the memory any refusal may take (under twice the file's size), a libhdf5 hang, and weights that are not
finite (loaded, with a warning naming each tensor)."""

from __future__ import annotations

import io
import json
import pickle
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from test_core import _TINY, HOSTILE_SAFETENSORS, random_canonical
from test_format_io import HOSTILE_MSGPACK

from opt_core import OPTConfig, keras_h5
from opt_core.checkpoint import load_checkpoint, save_checkpoint
from opt_core.errors import CheckpointError
from opt_core.flax_msgpack import read_msgpack
from opt_core.formats import FORMATS
from opt_core.safetensors_file import read_safetensors
from opt_core.torch_pickle import load_objects, load_state_dict

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SLACK = 4 * 2**20  # Python's own objects while refusing (an exception, a parsed header): not the file's bytes


def _legacy(*pickles: bytes) -> bytes:
    """torch.save's pre-1.6 stream: magic number, protocol version, sys info, then the given pickles."""
    head = [pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps({"little_endian": True}, 2)]
    return b"".join(head) + b"".join(pickles)


def _zipped(data_pkl: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
    return out.getvalue()


DEPTH = 1_000_000
NESTED_LISTS = b"\x80\x02" + b"]" * DEPTH + b"a" * (DEPTH - 1) + b"."  # [[[...]]] a million deep
NESTED_MARKS = b"\x80\x02" + b"(" * DEPTH + b"t" * DEPTH + b"."  # ((((...)))) a million deep
# BINUNICODE whose 4-byte length claims 2.1 GB: the C unpickler allocates it before reading (found by the fuzzer).
CLAIMS_2GB = b"\x80\x02X\x7cRq}"
MEMO_PAST_THE_PICKLE = b"\x80\x02N" + b"r\xff\xff\xff\x7f" + b"."  # LONG_BINPUT 2**31-1: a memo of 2**31 slots

HOSTILE_PICKLES = {
    "zip_nested_lists": (_zipped(NESTED_LISTS), "nests deeper than any checkpoint"),
    "zip_nested_marks": (_zipped(NESTED_MARKS), "nests deeper than any checkpoint"),
    "zip_claims_2GB_string": (_zipped(CLAIMS_2GB), "claims a \\d+-byte value"),
    "zip_memo_index_past_the_pickle": (_zipped(MEMO_PAST_THE_PICKLE), "memo index 2147483647 is out of range"),
    "legacy_nested_lists": (_legacy(NESTED_LISTS), "nests deeper than any checkpoint"),
    "legacy_claims_2GB_magic": (CLAIMS_2GB, "not a PyTorch checkpoint"),
    "legacy_claims_2GB_object": (_legacy(CLAIMS_2GB), "claims a \\d+-byte value"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_by_name(tmp_path, case):
    content, message = HOSTILE_PICKLES[case]
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    for read in (load_state_dict, load_objects):
        with pytest.raises(CheckpointError, match=message) as error:
            read(path)
        assert "pytorch_model.bin" in str(error.value)


def _hostile_files():
    for name, (content, _) in HOSTILE_SAFETENSORS.items():
        yield f"safetensors-{name}", "model.safetensors", content, read_safetensors
    for name, content in HOSTILE_MSGPACK.items():
        yield f"msgpack-{name}", "flax_model.msgpack", content, read_msgpack
    for name, (content, _) in HOSTILE_PICKLES.items():
        yield f"pickle-{name}", "pytorch_model.bin", content, load_state_dict


HOSTILE = {name: rest for name, *rest in _hostile_files()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_refusing_a_hostile_file_takes_under_twice_its_size(tmp_path, case):
    file_name, content, read = HOSTILE[case]
    path = tmp_path / file_name
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError):
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(content) + SLACK, f"{peak} bytes allocated refusing {len(content)} bytes"


def test_a_tf_model_h5_that_hangs_libhdf5_is_refused_in_bounded_time(monkeypatch):
    """The fuzzer's find: a few bytes changed in a real tf_model.h5 and reading an attribute never returns."""
    from pathlib import Path

    path = Path(__file__).parent / "fuzz_corpus" / "h5" / "crash-hang-global-heap" / "tf_model.h5"
    monkeypatch.setattr(keras_h5, "CHILD_TIMEOUT_S", 2.0)
    with pytest.raises(CheckpointError, match=r"tf_model.h5: the HDF5 library did not finish reading the file"):
        keras_h5.read_h5(path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_weights_that_are_not_finite_load_with_a_warning_naming_them(tmp_path, fmt):
    config = OPTConfig(**_TINY)
    canonical = random_canonical(config)
    canonical["model.decoder.layers.0.fc1.weight"][0, :3] = np.nan
    canonical["model.decoder.final_layer_norm.bias"][1] = -np.inf
    save_checkpoint(canonical, tmp_path, config, "causal_lm", fmt=fmt)
    with pytest.warns(UserWarning, match="weights that are not finite") as caught:
        match = load_checkpoint(tmp_path, config, "causal_lm")
    message = str(caught[0].message)
    assert "model.decoder.layers.0.fc1.weight (3 NaN, 0 infinite" in message
    assert "model.decoder.final_layer_norm.bias (0 NaN, 1 infinite" in message
    assert str(tmp_path) in message
    assert np.isnan(match.tensors["model.decoder.layers.0.fc1.weight"]).sum() == 3


def test_finite_weights_load_without_a_warning(tmp_path):
    config = OPTConfig(**_TINY)
    save_checkpoint(random_canonical(config), tmp_path, config, "causal_lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path, config, "causal_lm")


HOSTILE_INDEXES = {
    "shard_name_with_a_nul": ({"weight_map": {"w": "model-00001\x00.safetensors"}}, "is not a file name in the folder"),
    "nested_too_deep": ("[" * 100_000 + "]" * 100_000, "not a valid JSON index"),
}


@pytest.mark.parametrize("case", list(HOSTILE_INDEXES))
def test_hostile_shard_indexes_are_refused_by_name(tmp_path, case):
    from opt_core.formats import read_checkpoint

    content, message = HOSTILE_INDEXES[case]
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as error:
        read_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(error.value)
