"""A save never leaves stale weights: whatever a folder held before, the weights just saved are the ones that load.

Each case saves two different models in turn into one folder (single file, shards, another shard count, another
format) through every framework's `save_pretrained`, through `conversion`, and through `opt_core.checkpoint`, and
checks after every save that the folder holds exactly the new checkpoint and that it loads the new weights. A save
that fails midway leaves the previous checkpoint loadable and no temporary file behind.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_hf_model, sample_batch

import opt_core.safetensors_file
from conversion import convert
from opt_core.checkpoint import load_checkpoint, save_checkpoint
from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError
from opt_core.formats import FORMATS

BIG, SMALL, TINY = "5GB", 20_000, 6_000  # the tiny model holds about 60 kB of fp32 weights

# (format, max_shard_size) saves made in turn into one folder, alternating the two models.
SEQUENCES = {
    "single_to_sharded": [("safetensors", BIG), ("safetensors", SMALL)],
    "sharded_to_single": [("safetensors", SMALL), ("safetensors", BIG)],
    "more_shards_to_fewer": [("safetensors", TINY), ("safetensors", SMALL)],
    "bin_over_safetensors_and_back": [("safetensors", BIG), ("pytorch", BIG), ("safetensors", SMALL)],
    "sharded_bin_over_single_safetensors": [("safetensors", BIG), ("pytorch", SMALL), ("safetensors", BIG)],
    "h5_and_msgpack": [("flax", TINY), ("tf", SMALL), ("flax", BIG)],
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two HF checkpoints of the same tiny config with different weights."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"model_{seed}")
        make_hf_model("pre_ln", seed=seed).save_pretrained(folder)
        folders.append(folder)
    return folders


def logits(framework, model, ids, mask):
    return framework.numpy(framework(model, ids, attention_mask=mask).logits)


def assert_only_checkpoint(folder, written, fmt):
    """The folder holds the files just written and no weights of another save or format, nor temporary files."""
    weights = {p.name for p in folder.iterdir() if any(entry.owns(p.name) for entry in FORMATS.values())}
    assert weights == {p.name for p in written}, f"stale weights left beside the {fmt} save: {weights}"
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left: {leftovers}"
    for other in FORMATS:
        if other != fmt:
            with pytest.raises(CheckpointError):
                load_checkpoint(folder, OPTConfig.from_pretrained(folder), "causal_lm", fmt=other)


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_the_weights_just_saved_are_the_ones_that_load(framework, sequence, two_checkpoints, tmp_path):
    models = [framework.load(folder) for folder in two_checkpoints]
    ids, mask = sample_batch()
    expected = [logits(framework, model, ids, mask) for model in models]
    assert not np.allclose(expected[0], expected[1])
    folder = tmp_path / "saved"
    for step, (fmt, max_shard_size) in enumerate(SEQUENCES[sequence]):
        which = step % 2
        written = models[which].save_pretrained(folder, fmt=fmt, max_shard_size=max_shard_size)
        assert_only_checkpoint(folder, written, fmt)
        reloaded = framework.load(folder)
        np.testing.assert_array_equal(logits(framework, reloaded, ids, mask), expected[which], err_msg=f"save {step}")


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_core_save_checkpoint_leaves_one_checkpoint(sequence, two_checkpoints, tmp_path):
    config = OPTConfig.from_pretrained(two_checkpoints[0])
    states = [load_checkpoint(folder, config, "causal_lm").tensors for folder in two_checkpoints]
    folder = tmp_path / "saved"
    config.save_pretrained(folder)
    for step, (fmt, max_shard_size) in enumerate(SEQUENCES[sequence]):
        state = states[step % 2]
        written = save_checkpoint(state, folder, config, "causal_lm", fmt=fmt, max_shard_size=max_shard_size)
        assert_only_checkpoint(folder, written, fmt)
        loaded = load_checkpoint(folder, config, "causal_lm").tensors
        assert loaded.keys() == state.keys()
        for name, array in state.items():
            np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(array), err_msg=name)


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_conversion_into_a_used_folder_leaves_one_checkpoint(sequence, two_checkpoints, tmp_path):
    config = OPTConfig.from_pretrained(two_checkpoints[0])
    dst = tmp_path / "converted"
    for step, (fmt, max_shard_size) in enumerate(SEQUENCES[sequence]):
        source = two_checkpoints[step % 2]
        result = convert(source, dst, to=fmt, max_shard_size=max_shard_size, force=step > 0)
        assert_only_checkpoint(dst, [dst / name for name in result.files], fmt)
        loaded = load_checkpoint(dst, config, "causal_lm").tensors
        for name, array in load_checkpoint(source, config, "causal_lm").tensors.items():
            np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(array), err_msg=name)


@pytest.mark.parametrize("max_shard_size", [BIG, SMALL])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(
    framework, max_shard_size, two_checkpoints, tmp_path, monkeypatch
):
    old, new = (framework.load(folder) for folder in two_checkpoints)
    ids, mask = sample_batch()
    folder = tmp_path / "saved"
    old.save_pretrained(folder, fmt="safetensors", max_shard_size=TINY)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_writer, calls = opt_core.safetensors_file.write_safetensors, []

    def failing_writer(tensors, path):
        calls.append(path)
        if len(calls) == (1 if max_shard_size == BIG else 2):
            real_writer(dict(list(tensors.items())[:1]), path)  # a partial file, then the disk fills up
            raise OSError("disk full")
        real_writer(tensors, path)

    monkeypatch.setattr(opt_core.safetensors_file, "write_safetensors", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(folder, fmt="safetensors", max_shard_size=max_shard_size, dtype="float16")
    monkeypatch.undo()
    # Weights, config.json (which would say float16) and generation_config.json: all as before, nothing added.
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "the failed save changed the folder"
    reloaded = framework.load(folder)
    np.testing.assert_array_equal(logits(framework, reloaded, ids, mask), logits(framework, old, ids, mask))


@pytest.mark.parametrize("framework", ["torch", "tf"], indirect=True)
def test_loading_leaves_the_global_random_state_alone(framework, two_checkpoints):
    """torch.manual_seed / keras.utils.set_random_seed govern what a user draws after loading, as before it."""
    import keras
    import torch

    def draws():
        return float(torch.rand(())), float(np.random.random()), float(keras.random.uniform(()))

    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    expected = draws()
    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    framework.load(two_checkpoints[0])
    assert draws() == expected
