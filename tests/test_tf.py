"""What only opt_tf (Keras 3 on TensorFlow) has, against HF transformers' PyTorch OPT (the oracle): XLA-compiled
forwards and static-cache decoding, Keras variables, HF's h5 layout, Keras' own weights files, `fit`. The checks
every framework passes the same way (every variant, path and head, checkpoints in every format, bad input) are in
`test_frameworks.py`."""

from __future__ import annotations

import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from conftest import HEADS, VARIANTS, assert_close_on_real_tokens, sample_batch, variant_kwargs  # noqa: E402
from frameworks import main_output  # noqa: E402

import opt_tf  # noqa: E402
import opt_torch  # noqa: E402
from opt_core.formats import read_checkpoint  # noqa: E402
from opt_core.weights import parameter_specs  # noqa: E402
from opt_tf.modeling import KVCache, OPTLayerNorm  # noqa: E402

OURS = {
    "base": opt_tf.TFOPTModel,
    "causal_lm": opt_tf.TFOPTForCausalLM,
    "sequence_classification": opt_tf.TFOPTForSequenceClassification,
    "question_answering": opt_tf.TFOPTForQuestionAnswering,
}


def torch_output(model, head, ids, mask, **kwargs):
    with torch.no_grad():
        return main_output(model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs), head)


def canonical_equal(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and np.array_equal(actual[name], array), name


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
def compiled():
    """compiled(model) -> the model's call under tf.function(jit_compile=True), one per model (one XLA compile
    per input shape)."""
    cache = {}

    def get(model):
        if id(model) not in cache:

            @tf.function(jit_compile=True)
            def call(*args, **kwargs):
                return model(*args, **kwargs)

            cache[id(model)] = call
        return cache[id(model)]

    return get


# ----- against the oracle


@pytest.mark.parametrize("variant", VARIANTS)
def test_xla_forward_matches_hf(loaded, compiled, variant):
    ours, hf = loaded(variant)
    ids, mask = sample_batch(seed=10)
    actual = compiled(ours)(tf.constant(ids), attention_mask=tf.constant(mask), use_cache=False).logits
    assert_close_on_real_tokens(actual, torch_output(hf, "causal_lm", ids, mask), mask)


def test_sequence_classification_pools_rightmost_non_pad_token(loaded):
    ours, hf = loaded("post_ln_proj", "sequence_classification")
    ids, _ = sample_batch(seed=13, pad_rows=())
    ids[0, 6:], ids[1, 3:] = 1, 1  # right padding: rows end at different places
    mask = (ids != 1).astype(np.int64)
    expected = torch_output(hf, "sequence_classification", ids, mask)
    np.testing.assert_allclose(ours(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)


def decode_case(seed=2):
    ids, mask = sample_batch(seed=seed, length=12)
    mask[0, 4:6] = 0  # a hole in the middle of a row, not just left padding
    splits = sorted(np.random.default_rng(7).choice(np.arange(1, 11), size=2, replace=False))
    return ids, mask, splits


XLA_VARIANTS = [v if v in ("pre_ln", "post_ln_proj") else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS]


@pytest.mark.parametrize("variant", XLA_VARIANTS)
def test_static_cache_decode_under_xla_at_random_splits(loaded, compiled, variant):
    """The static cache (B S N H, mask over all S slots): eager prefill, then an XLA step compiled once."""
    ours, hf = loaded(variant)
    ids, mask, splits = decode_case()
    full = torch_output(hf, "causal_lm", ids, mask)
    step = compiled(ours)
    traces = step.experimental_get_tracing_count()
    for split in splits:
        out = ours(ids[:, :split], attention_mask=mask, past_key_values=ours.init_cache(*ids.shape))
        pieces, cache = [np.asarray(out.logits)], out.past_key_values
        for t in range(split, ids.shape[1]):
            out = step(tf.constant(ids[:, t : t + 1]), attention_mask=tf.constant(mask), past_key_values=cache)
            pieces.append(np.asarray(out.logits))
            cache = out.past_key_values
        assert int(cache.index) == ids.shape[1]
        assert_close_on_real_tokens(np.concatenate(pieces, axis=1), full, mask, what=f"split {split}")
    assert step.experimental_get_tracing_count() == traces + 1  # one compile serves every step of every split


def test_static_cache_step_runs_in_a_compiled_while_loop(loaded):
    """Greedy decoding entirely inside one tf.function(jit_compile=True): the step as a tf.while_loop body."""
    ours, hf = loaded("post_ln_proj")
    ids, mask = sample_batch(seed=3, length=6)
    new_tokens = 5
    batch, prompt = ids.shape
    max_length = prompt + new_tokens

    @tf.function(jit_compile=True)
    def greedy(ids, mask):
        full_mask = tf.concat([mask, tf.zeros((batch, new_tokens), mask.dtype)], axis=1)  # B S
        out = ours(ids, attention_mask=full_mask, past_key_values=ours.init_cache(batch, max_length))
        token = tf.argmax(out.logits[:, -1], axis=-1, output_type=tf.int32)[:, None]
        tokens = tf.TensorArray(tf.int32, size=new_tokens)

        def body(i, token, full_mask, cache, tokens):
            tokens = tokens.write(i, token[:, 0])
            full_mask = tf.tensor_scatter_nd_update(
                full_mask, tf.stack([tf.range(batch), tf.fill([batch], prompt + i)], -1), tf.ones([batch], mask.dtype)
            )
            out = ours(token, attention_mask=full_mask, past_key_values=cache)
            token = tf.argmax(out.logits[:, -1], axis=-1, output_type=tf.int32)[:, None]
            return i + 1, token, full_mask, out.past_key_values, tokens

        *_, tokens = tf.while_loop(
            lambda i, *_: i < new_tokens, body, (0, token, full_mask, out.past_key_values, tokens)
        )
        return tf.transpose(tokens.stack())  # B new_tokens

    actual = greedy(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32)).numpy()
    with torch.no_grad():
        expected = hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=1,
        )[:, prompt:]
    np.testing.assert_array_equal(actual, expected.numpy())


def test_cache_layouts_and_explicit_position_ids(loaded):
    ours, _ = loaded("post_ln_proj")
    config = ours.config
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    out = ours(ids, use_cache=True)
    assert len(out.past_key_values) == config.num_hidden_layers
    k, v = out.past_key_values[0]
    assert k.shape == v.shape == (2, config.num_attention_heads, 3, config.head_dim)  # HF's tuple: B N S H
    cache = ours.init_cache(2, 7)
    assert isinstance(cache, KVCache) and len(cache.key_values) == config.num_hidden_layers and int(cache.index) == 0
    k, v = cache.key_values[0]
    assert k.shape == v.shape == (2, 7, config.num_attention_heads, config.head_dim)  # static: B S N H
    prefill = ours(ids[:, :2], attention_mask=np.ones((2, 7)), past_key_values=cache)
    step = ours(
        ids[:, 2:],
        attention_mask=np.ones((2, 7)),
        position_ids=np.array([[2], [2]]),
        past_key_values=prefill.past_key_values,
    )
    np.testing.assert_allclose(step.logits[:, 0], out.logits[:, 2], atol=1e-5, rtol=0)


def test_tuple_outputs_logits_to_keep_and_model_call(loaded):
    ours, _ = loaded("pre_ln")
    ids, mask = sample_batch(seed=4)
    full = ours(ids, attention_mask=mask)
    assert isinstance(ours(ids, attention_mask=mask, return_dict=False), tuple) and full["logits"] is full[0]
    np.testing.assert_array_equal(ours(ids, attention_mask=mask, logits_to_keep=1).logits, full.logits[:, -1:])
    np.testing.assert_array_equal(ours.call(ids, attention_mask=mask).logits, full.logits)


def test_dropout_only_in_training(loaded):
    ours, _ = loaded("pre_ln")
    model = opt_tf.TFOPTForCausalLM(ours.config.replace(dropout=0.5, attention_dropout=0.5))
    model.set_weights(ours.get_weights())
    ids, mask = sample_batch(seed=5)
    inference = model(ids, attention_mask=mask).logits
    np.testing.assert_array_equal(inference, ours(ids, attention_mask=mask).logits)
    assert not np.allclose(model(ids, attention_mask=mask, training=True).logits, inference)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_equals_keras_bit_for_bit(policy, affine):
    """OPTLayerNorm is Keras' LayerNormalization with fewer traced operations: the same bits, values and gradients,
    eagerly and under XLA."""
    rng = np.random.default_rng(0)
    ours = OPTLayerNorm(epsilon=1e-5, center=affine, scale=affine, dtype=policy)
    keras_norm = keras.layers.LayerNormalization(epsilon=1e-5, center=affine, scale=affine, dtype=policy)
    x = tf.constant(rng.normal(1.0, 3.0, size=(2, 5, 64)).astype(np.float32))
    for layer in (ours, keras_norm):
        layer.build(x.shape)
        if affine:
            layer.set_weights([np.linspace(-2, 2, 64, dtype=np.float32), np.linspace(1, -1, 64, dtype=np.float32)])

    def value_and_gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return [y, *tape.gradient(loss, [x, *layer.trainable_weights])]

    for got, want in zip(value_and_gradients(ours), value_and_gradients(keras_norm)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    compiled = [tf.function(layer.__call__, jit_compile=True, autograph=False)(x) for layer in (ours, keras_norm)]
    np.testing.assert_array_equal(np.asarray(compiled[0], np.float32), np.asarray(compiled[1], np.float32))


# ----- variables: the parameter table's


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head", HEADS)
def test_fresh_model_variables_are_the_tables(variant, head):
    config = opt_tf.OPTConfig(**variant_kwargs(variant), num_labels=3)
    model = OURS[head](config)
    specs = parameter_specs(config, head)
    state = model.canonical_state()  # looks every table row up by its attribute path
    assert list(state) == [spec.name for spec in specs]
    assert all(state[spec.name].shape == spec.shape for spec in specs)
    assert len(model.weights) == len(specs)  # and the model has no variable outside the table


# ----- checkpoints: HF's h5 layout, the torch implementation, Keras' own files


@pytest.mark.parametrize("variant", VARIANTS)
def test_h5_round_trip_is_bit_exact_and_loads_in_torch(loaded, tmp_path, variant):
    ours, hf = loaded(variant)
    ours.save_pretrained(tmp_path)  # tf_model.h5 by default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "tf_model.h5"]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["OPTForCausalLM"]
    with h5py.File(tmp_path / "tf_model.h5") as f:  # HF's Keras-2 layout and names
        assert [str(x, "utf8") if isinstance(x, bytes) else x for x in f.attrs["layer_names"]][0] == "model"
        assert f["model/tfopt_for_causal_lm/model/decoder/layers.0/self_attn/q_proj/kernel:0"].shape == (32, 32)
        assert f["model/tfopt_for_causal_lm/model/decoder/embed_tokens/weight:0"].shape[0] == 101
        assert "model/tfopt_for_causal_lm/model/decoder/embed_positions/embeddings:0" in f
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items() if k in ours.canonical_state()}
    canonical_equal(ours.canonical_state(), hf_state)  # HF -> us is bit-exact
    _, from_file = read_checkpoint(tmp_path)
    assert len(from_file) == len(hf_state)
    canonical_equal(opt_tf.TFOPTForCausalLM.from_pretrained(tmp_path).canonical_state(), hf_state)
    theirs = opt_torch.OPTForCausalLM.from_pretrained(tmp_path)
    canonical_equal({k: v for k, v in theirs.canonical_state().items() if k in hf_state}, hf_state)
    ids, mask = sample_batch(seed=11)
    assert_close_on_real_tokens(
        ours(ids, attention_mask=mask).logits, torch_output(theirs, "causal_lm", ids, mask), mask
    )


def test_torch_written_bin_folder_loads(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("post_ln_proj")
    theirs = opt_torch.OPTForCausalLM.from_pretrained(folder)
    theirs.save_pretrained(tmp_path, safe_serialization=False)  # pytorch_model.bin
    ours = opt_tf.TFOPTForCausalLM.from_pretrained(tmp_path)
    canonical_equal(
        ours.canonical_state(), {k: v for k, v in theirs.canonical_state().items() if k != "lm_head.weight"}
    )
    ids, mask = sample_batch(seed=14)
    assert_close_on_real_tokens(
        ours(ids, attention_mask=mask).logits, torch_output(theirs, "causal_lm", ids, mask), mask
    )


def test_keras_weights_and_model_files_round_trip(loaded, tmp_path):
    ours, _ = loaded("post_ln_proj")
    ours.save_weights(tmp_path / "model.weights.h5")  # Keras 3's own formats
    clone = opt_tf.TFOPTForCausalLM.from_config(ours.get_config())
    assert clone.config == ours.config
    clone.load_weights(tmp_path / "model.weights.h5")
    canonical_equal(clone.canonical_state(), ours.canonical_state())
    ours.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert type(restored) is opt_tf.TFOPTForCausalLM and restored.config == ours.config
    canonical_equal(restored.canonical_state(), ours.canonical_state())


# ----- training


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)  # a fixed initialisation: unseeded, one run in four fell short of halving the loss
    config = opt_tf.OPTConfig(**variant_kwargs("pre_ln"))
    model = opt_tf.TFOPTForCausalLM(config)
    rows = np.stack([np.roll(np.arange(3, 19), shift) for shift in range(16)]).astype(np.int32)  # a learnable cycle
    dataset = tf.data.Dataset.from_tensor_slices(rows).repeat(4).batch(8)  # ids only: the labels are the ids
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    losses = model.fit(dataset, epochs=3, shuffle=False, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    ids, mask = sample_batch(seed=9)
    labelled = tf.data.Dataset.from_tensors({"input_ids": ids, "attention_mask": mask, "labels": ids})
    with_labels = model.evaluate(labelled, verbose=0, return_dict=True)["loss"]
    as_ids = model.evaluate(tf.data.Dataset.from_tensors((ids, ids)), verbose=0, return_dict=True)["loss"]
    assert np.isfinite(with_labels) and np.isfinite(as_ids)
    predicted = model.predict(tf.data.Dataset.from_tensor_slices(ids).batch(2), verbose=0)
    np.testing.assert_allclose(predicted["logits"], model(ids).logits, atol=1e-5, rtol=0)


# ----- bad input: under XLA


def test_under_xla_values_are_not_checked(loaded, compiled):
    ours, _ = loaded("pre_ln")
    # Symbolic values cannot be checked; XLA's gather clamps an out-of-range id to the last row (documented).
    step = compiled(ours)
    clamped = step(tf.constant([[5, 6, 101]]), use_cache=False).logits
    np.testing.assert_array_equal(clamped, step(tf.constant([[5, 6, 100]]), use_cache=False).logits)


def test_pad_lookups_pass_no_gradient_to_the_pad_row_as_in_torch(loaded):
    """HF's embed_tokens has padding_idx=pad: fine-tuning on padded rows must not move the pad row through its
    lookups (issue 16); a tied LM head's gradient on that row still flows, as in HF."""
    model, _ = loaded("pre_ln", "base")
    pad = model.config.pad_token_id
    ids = np.array([[pad, pad, 5, 6, 7], [8, 9, 10, pad, 11]])
    table = model.get_input_embeddings().embeddings
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model(ids).last_hidden_state)
    grad = tf.convert_to_tensor(tape.gradient(total, table)).numpy()
    assert np.all(grad[pad] == 0)
    assert np.any(grad[5] != 0)

    model, hf = loaded("pre_ln")  # tied: the head's logits reach every row of the table, the pad row too
    weights = np.random.default_rng(0).standard_normal((*ids.shape, model.config.vocab_size)).astype(np.float32)
    table = model.get_input_embeddings().embeddings
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model(ids).logits * weights)
    grad = tf.convert_to_tensor(tape.gradient(total, table)).numpy()
    try:
        (hf(torch.from_numpy(ids)).logits * torch.from_numpy(weights)).sum().backward()
        expected = hf.get_input_embeddings().weight.grad.numpy().copy()
    finally:
        hf.zero_grad(set_to_none=True)
    assert np.any(expected[pad] != 0)
    np.testing.assert_allclose(grad, expected, atol=1e-5)
