"""What only opt_flax has, against HF transformers' PyTorch OPT (the oracle): jit, HF's Flax params layout and
msgpack, dropout rngs, checks inside a user's jit, sharding rules. The checks every framework passes the same way
(every variant, path and head, checkpoints in every format, bad input) are in `test_frameworks.py`; the sharded
forward over a device mesh is in `test_flax_mesh.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HEADS, VARIANTS, assert_close_on_real_tokens, sample_batch, variant_kwargs

import opt_flax
import opt_torch
from opt_core.errors import CheckpointError, InputError
from opt_core.weights import parameter_specs
from opt_flax.pretrained import params_to_canonical

# The oracle runs fp32 matmuls in full precision; so must we (TPUs default to bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")

OURS = {
    "base": opt_flax.FlaxOPTModel,
    "causal_lm": opt_flax.FlaxOPTForCausalLM,
    "sequence_classification": opt_flax.FlaxOPTForSequenceClassification,
    "question_answering": opt_flax.FlaxOPTForQuestionAnswering,
}
REPO = Path(__file__).resolve().parents[1]


def hf_output(hf, head, ids, mask, **kwargs):
    with torch.no_grad():
        out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
    if head == "base":
        return out.last_hidden_state.numpy()
    if head == "question_answering":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
    return out.logits.numpy()


def assert_params_equal(actual, expected):
    flat_a, flat_e = (jax.tree_util.tree_flatten_with_path(p)[0] for p in (actual, expected))
    assert [k for k, _ in flat_a] == [k for k, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e):
        assert a.dtype == e.dtype and np.array_equal(np.asarray(a), np.asarray(e)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    """loaded(variant, head) -> (our model loaded from the folder HF wrote, the HF torch model)."""
    cache = {}

    def get(variant, head="causal_lm"):
        if (variant, head) not in cache:
            folder, hf = hf_checkpoint(variant, head)
            cache[variant, head] = (OURS[head].from_pretrained(folder), hf)
        return cache[variant, head]

    return get


@pytest.fixture(scope="module")
def jitted():
    """jitted(model) -> jax.jit(model.__call__), one per model (each compiles once per input shape)."""
    cache = {}

    def get(model):
        if id(model) not in cache:
            cache[id(model)] = jax.jit(model.__call__)
        return cache[id(model)]

    return get


# ----- against the oracle


@pytest.mark.parametrize("variant", VARIANTS)
def test_jitted_forward_matches_hf(loaded, jitted, variant):
    ours, hf = loaded(variant)
    ids, mask = sample_batch(seed=10)
    actual = jitted(ours)(ids, mask, params=ours.params).logits
    assert_close_on_real_tokens(actual, hf_output(hf, "causal_lm", ids, mask), mask)


def test_cache_layout_and_explicit_position_ids(loaded, jitted):
    ours, _ = loaded("post_ln_proj")
    config = ours.config
    cache = ours.init_cache(2, 5)
    assert len(cache.key_values) == config.num_hidden_layers and int(cache.index) == 0
    k, v = cache.key_values[0]
    assert k.shape == v.shape == (2, 5, config.num_attention_heads, config.head_dim)  # B S N H
    ids = np.array([[5, 6, 7], [1, 9, 10]])
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 0, 0]])  # zeros past the tokens so far, as HF Flax passes it
    forward = jitted(ours)
    out = forward(ids[:, :2], mask, params=ours.params, past_key_values=cache)
    step = forward(ids[:, 2:], mask, np.array([[2], [1]]), ours.params, out.past_key_values)
    full = forward(ids, mask[:, :3], params=ours.params).logits
    np.testing.assert_allclose(step.logits[:, 0], full[:, 2], atol=1e-5, rtol=0)
    assert int(step.past_key_values.index) == 3


def test_tuple_outputs_and_logits_to_keep(loaded):
    ours, _ = loaded("pre_ln")
    ids, mask = sample_batch(seed=4)
    full = ours(ids, mask)
    assert isinstance(ours(ids, mask, return_dict=False), tuple) and full["logits"] is full[0]
    np.testing.assert_array_equal(ours(ids, mask, logits_to_keep=1).logits, full.logits[:, -1:])


def test_dropout_only_in_training_with_an_rng(loaded):
    ours, _ = loaded("pre_ln")
    model = opt_flax.FlaxOPTForCausalLM(ours.config.replace(dropout=0.5, attention_dropout=0.5), _do_init=False)
    ids, mask = sample_batch(seed=5)
    inference = model(ids, mask, params=ours.params).logits
    np.testing.assert_array_equal(inference, ours(ids, mask).logits)  # inference by default: dropout off
    with pytest.raises(ValueError, match="dropout_rng"):
        model(ids, mask, params=ours.params, train=True)
    key = jax.random.key(3)
    train = model(ids, mask, params=ours.params, train=True, dropout_rng=key).logits
    assert not np.allclose(train, inference)
    np.testing.assert_array_equal(train, model(ids, mask, params=ours.params, train=True, dropout_rng=key).logits)


# ----- params: HF's Flax layout, checkpoints


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head", HEADS)
def test_fresh_params_have_the_tables_layout(variant, head):
    config = opt_flax.OPTConfig(**variant_kwargs(variant), num_labels=3)
    model = OURS[head](config, _do_init=False)
    shapes = jax.eval_shape(model.module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    canonical = params_to_canonical(zeros, config, head)  # raises naming any path or shape off the table
    assert set(canonical) == {spec.name for spec in parameter_specs(config, head)}
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, model.init_weights())  # Linen == table init
    top = {
        "base": {"decoder"},  # HF's FlaxOPTModel
        "causal_lm": {"model", "lm_head"} if variant == "untied" else {"model"},
        "sequence_classification": {"model", "score"},
        "question_answering": {"model", "qa_outputs"},
    }
    assert set(shapes) == top[head]


@pytest.mark.parametrize("variant", VARIANTS)
def test_flax_msgpack_round_trip_is_bit_exact_and_loads_in_torch(loaded, tmp_path, variant):
    import flax.serialization

    ours, _ = loaded(variant)
    ours.save_pretrained(tmp_path)  # flax_model.msgpack by default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "flax_model.msgpack", "generation_config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["OPTForCausalLM"]
    restored = flax.serialization.msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes())
    assert_params_equal(restored, ours.params)  # flax itself reads HF's layout back
    assert_params_equal(opt_flax.FlaxOPTForCausalLM.from_pretrained(tmp_path).params, ours.params)
    theirs = opt_torch.OPTForCausalLM.from_pretrained(tmp_path)
    ids, mask = sample_batch(seed=11)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert_close_on_real_tokens(ours(ids, mask).logits, expected, mask)


def test_base_model_from_a_head_checkpoint_has_hfs_layout(hf_checkpoint):
    folder, _ = hf_checkpoint("untied", "causal_lm")
    with pytest.warns(UserWarning, match="lm_head.weight"):
        model = opt_flax.FlaxOPTModel.from_pretrained(folder)
    assert set(model.params) == {"decoder"}  # HF's FlaxOPTModel layout


def test_bin_checkpoint_loads_without_torch(hf_checkpoint, tmp_path):
    folder, hf = hf_checkpoint("post_ln_proj")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # a .bin as older HF versions wrote them
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    script = f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` fails
        import numpy as np, jax
        from opt_flax import FlaxOPTForCausalLM
        params = FlaxOPTForCausalLM.from_pretrained({str(tmp_path)!r}).params
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez({str(tmp_path / "params.npz")!r}, **{{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}})
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, env=env, timeout=120)
    expected = opt_flax.FlaxOPTForCausalLM.from_pretrained(folder).params
    saved = np.load(tmp_path / "params.npz")
    for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        np.testing.assert_array_equal(saved[jax.tree_util.keystr(path)], leaf)


def test_params_that_do_not_match_are_named(loaded, tmp_path):
    ours, _ = loaded("pre_ln")
    params = jax.tree.map(lambda x: x, ours.params)
    del params["model"]["decoder"]["layers"]["1"]["fc2"]["bias"]
    params["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"] = jnp.zeros((48, 32))
    with pytest.raises(CheckpointError, match=r"missing 'model/decoder/layers/1/fc2/bias'.*layers/0/fc1/kernel"):
        ours.save_pretrained(tmp_path, params)


# ----- jit: pure in its arrays and params, one trace per input shape


def test_jit_does_not_retrace_for_new_inputs_of_the_same_shape(loaded):
    ours, _ = loaded("no_bias")
    traces = []

    def forward(ids, mask, params):
        traces.append(ids.shape)
        return ours(ids, mask, params=params).logits

    step = jax.jit(forward)
    for seed in range(3):
        ids, mask = sample_batch(seed=seed)
        assert_close_on_real_tokens(step(ids, mask, ours.params), ours(ids, mask).logits, mask)
    other = jax.tree.map(lambda x: x * 1.01, ours.params)  # new params of the same shapes: no retrace either
    step(ids, mask, other)
    assert len(traces) == 1
    method = jax.jit(ours.__call__)
    method(ids, mask, params=ours.params)
    method(ids + 1, mask, params=other)
    assert method._cache_size() == 1


# ----- bad input: inside a jit


def test_inside_a_users_jit_shapes_are_checked_values_cannot_be(loaded):
    ours, _ = loaded("pre_ln")
    step = jax.jit(ours.__call__)
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 4\)"):
        step(np.array([[5, 6, 7]]), np.ones((1, 4), np.int32), params=ours.params)
    # A traced token id cannot be checked: JAX's gather fills out-of-range rows with NaN (documented).
    logits = step(np.array([[5, 6, 101]]), np.ones((1, 3), np.int32), params=ours.params).logits
    assert np.isnan(np.asarray(logits)[0, 2]).all()


# ----- sharding rules (the sharded forward itself runs in test_flax_mesh.py, on 8 forced host devices)


def test_partition_specs_follow_the_table():
    from jax.sharding import PartitionSpec as P

    from opt_flax.sharding import flat_partition_specs

    config = opt_flax.OPTConfig(**variant_kwargs("untied"))  # V 101, N 4, D 32, F 48
    specs = flat_partition_specs(config, "causal_lm", model_size=4)
    layer = "model/decoder/layers/0/"
    assert specs[layer + "self_attn/q_proj/kernel"] == P(None, "model")  # column parallel: whole heads
    assert specs[layer + "self_attn/q_proj/bias"] == P("model")
    assert specs[layer + "self_attn/out_proj/kernel"] == P("model", None)  # row parallel
    assert specs[layer + "self_attn/out_proj/bias"] == P()
    assert specs[layer + "fc1/kernel"] == P(None, "model") and specs[layer + "fc2/kernel"] == P("model", None)
    assert specs[layer + "final_layer_norm/scale"] == P() and specs["model/decoder/embed_positions/embedding"] == P()
    assert specs["model/decoder/embed_tokens/embedding"] == P()  # 101 rows: 4 does not divide them, replicated
    assert flat_partition_specs(config, "causal_lm", model_size=1)["lm_head/kernel"] == P(None, "model")  # vocab
    assert flat_partition_specs(config, "causal_lm", model_size=8)[layer + "self_attn/q_proj/kernel"] == P()
    params = opt_flax.FlaxOPTForCausalLM(config).params
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert {"/".join(k.key for k in path) for path, _ in leaves} == set(specs)


def test_pad_lookups_pass_no_gradient_to_the_pad_row_as_in_torch(loaded):
    """HF's embed_tokens has padding_idx=pad: fine-tuning on padded rows must not move the pad row (issue 16)."""
    model, _ = loaded("pre_ln", "base")
    pad = model.config.pad_token_id
    ids = jnp.array([[pad, pad, 5, 6, 7], [8, 9, 10, pad, 11]])

    def total(params):
        return model(ids, params=params).last_hidden_state.sum()

    grads = jax.tree_util.tree_leaves_with_path(jax.grad(total)(model.params))
    table = next(leaf for path, leaf in grads if "embed_tokens" in jax.tree_util.keystr(path))
    assert np.all(np.asarray(table[pad]) == 0)
    assert np.any(np.asarray(table[5]) != 0)
