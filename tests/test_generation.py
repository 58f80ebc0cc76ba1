"""generate() against HF transformers' PyTorch generate (the oracle), on left-padded batches, for every framework
that implements it; and the three frameworks against each other for deterministic strategies and seeded sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sample_batch

from opt_core.errors import ConfigError

FRAMEWORKS = ["torch", "flax", "tf"]


def load_generator(framework: str, folder):
    """A function (ids, mask, **options) -> numpy ids, for one framework's generate."""
    if framework == "torch":
        import opt_torch

        model = opt_torch.OPTForCausalLM.from_pretrained(folder)
        return lambda ids, mask, **kw: model.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw
        ).numpy()
    if framework == "flax":
        import opt_flax

        model = opt_flax.FlaxOPTForCausalLM.from_pretrained(folder)
        return lambda ids, mask, **kw: model.generate(ids, attention_mask=mask, **kw)
    if framework == "tf":
        import opt_tf

        model = opt_tf.TFOPTForCausalLM.from_pretrained(folder)
        return lambda ids, mask, **kw: model.generate(ids, attention_mask=mask, **kw)
    raise ValueError(framework)


@pytest.fixture(scope="module")
def oracle_and_folder(hf_checkpoint):
    folder, hf = hf_checkpoint("post_ln_proj")
    hf.set_attn_implementation("sdpa")  # HF's default; the shared model is restored afterwards
    yield hf, folder
    hf.set_attn_implementation("eager")


@pytest.fixture(scope="module")
def generators(oracle_and_folder):
    _, folder = oracle_and_folder
    return {fw: load_generator(fw, folder) for fw in FRAMEWORKS}


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **kw).numpy()


def eos_that_stops_early(hf, ids, mask):
    """eos ids that the greedy continuation hits within a few steps in every row, so rows finish at different steps."""
    greedy = hf_generate(hf, ids, mask, max_new_tokens=8, eos_token_id=None)
    return sorted({int(greedy[row, ids.shape[1] + 1 + row]) for row in range(ids.shape[0])})


CASES = {
    "greedy": dict(max_new_tokens=12),
    "max_length": dict(max_length=15),
    "repetition_penalty": dict(max_new_tokens=12, repetition_penalty=1.3),
    "no_repeat_ngram": dict(max_new_tokens=12, no_repeat_ngram_size=2),
    "beam": dict(max_new_tokens=10, num_beams=3),
    "beam_return_2": dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, length_penalty=0.6),
    "beam_early_stopping": dict(max_new_tokens=10, num_beams=3, early_stopping=True),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", CASES)
def test_ids_equal_hf_on_left_padded_batch(oracle_and_folder, generators, framework, case):
    hf, _ = oracle_and_folder
    ids, mask = sample_batch(seed=11, length=7)
    expected = hf_generate(hf, ids, mask, **CASES[case])
    actual = generators[framework](ids, mask, **CASES[case])
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("strategy", ["greedy", "beam", "min_new_tokens"])
def test_eos_stopping_equals_hf(oracle_and_folder, generators, framework, strategy):
    hf, _ = oracle_and_folder
    ids, mask = sample_batch(seed=12, length=6)
    eos = eos_that_stops_early(hf, ids, mask)
    options = {"greedy": {}, "beam": dict(num_beams=3), "min_new_tokens": dict(min_new_tokens=6)}[strategy]
    expected = hf_generate(hf, ids, mask, max_new_tokens=15, eos_token_id=eos, **options)
    actual = generators[framework](ids, mask, max_new_tokens=15, eos_token_id=eos, **options)
    np.testing.assert_array_equal(actual, expected)
    if strategy == "greedy":
        assert actual.shape[1] < ids.shape[1] + 15  # stopped when the last row finished, not at the buffer's end
        assert (actual == 1).any()  # finished rows were padded with pad_token_id


def test_tf_and_flax_read_the_out_in_layout_at_one_row_only(oracle_and_folder):
    """opt_core.generation.decode_layout_pays: the [out, in] copy is made for one-row decode steps, not for more
    (a batch, beams), where XLA CPU's products read the stored kernels faster; the ids agree either way
    (test_left_padded_batch_equals_rows_alone)."""
    import opt_flax
    import opt_tf

    _, folder = oracle_and_folder
    ids, mask = sample_batch(seed=13, length=8)
    keras_model = opt_tf.TFOPTForCausalLM.from_pretrained(folder)
    flax_model = opt_flax.FlaxOPTForCausalLM.from_pretrained(folder)
    for model in (keras_model, flax_model):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, num_beams=2)
    assert keras_model._compiled.layout is None and flax_model._decode_layout.params is None
    for model in (keras_model, flax_model):
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2)
    assert keras_model._compiled.layout is not None and flax_model._decode_layout.params is not None


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_left_padded_batch_equals_rows_alone(generators, framework):
    ids, mask = sample_batch(seed=13, length=8)
    batched = generators[framework](ids, mask, max_new_tokens=10)
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone = generators[framework](ids[row : row + 1, real], mask[row : row + 1, real], max_new_tokens=10)
        np.testing.assert_array_equal(batched[row, ids.shape[1] :], alone[0, real.sum() :])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sampling_is_reproducible_from_a_seed(generators, framework):
    ids, mask = sample_batch(seed=14, length=5)
    options = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    first = generators[framework](ids, mask, seed=3, **options)
    assert np.array_equal(first, generators[framework](ids, mask, seed=3, **options))
    assert not np.array_equal(first, generators[framework](ids, mask, seed=4, **options))


@pytest.mark.parametrize("framework", [fw for fw in FRAMEWORKS if fw != "torch"])
def test_seeded_sampling_equals_torch(generators, framework):
    ids, mask = sample_batch(seed=14, length=5)
    options = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    for seed in (3, 4):
        expected = generators["torch"](ids, mask, seed=seed, **options)
        np.testing.assert_array_equal(generators[framework](ids, mask, seed=seed, **options), expected)


def test_flax_does_not_retrace_for_the_same_shapes_and_options(generators):
    """The second call reuses the compiled loop, also with new values of the traced options (seed, temperature,
    eos id, min length)."""
    from opt_flax.generation import TRACES

    ids, mask = sample_batch(seed=14, length=5)
    options = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9)
    generators["flax"](ids, mask, seed=3, temperature=0.8, **options)
    traces = dict(TRACES)
    generators["flax"](ids, mask, seed=5, temperature=0.6, eos_token_id=7, min_new_tokens=3, **options)
    assert dict(TRACES) == traces


def test_tf_does_not_retrace_for_the_same_shapes_and_options(generators):
    """The second call reuses the compiled programs (the whole loop, and the host loop's start and step), also with
    new values of the traced options (seed, temperature, eos ids, min length)."""
    from opt_tf.generation import TRACES

    class Quiet:
        def put(self, value):
            pass

        def end(self):
            pass

    ids, mask = sample_batch(seed=14, length=5)
    options = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9)
    generators["tf"](ids, mask, seed=3, temperature=0.8, **options)
    generators["tf"](ids[:1], mask[:1], max_new_tokens=4, streamer=Quiet())
    traces = dict(TRACES)
    generators["tf"](ids, mask, seed=5, temperature=0.6, eos_token_id=[7, 9], min_new_tokens=3, **options)
    generators["tf"](ids[:1], mask[:1], max_new_tokens=4, streamer=Quiet(), eos_token_id=None)
    assert dict(TRACES) == traces


def test_tf_decode_step_compiles_once_for_every_cache_index(oracle_and_folder):
    """XLA specialises a program on any input it takes as a compile-time constant (e.g. a tf.slice start): the host
    loop's step would then compile once per token. The same HLO at two cache indices shows it does not."""
    import tensorflow as tf

    import opt_tf
    from opt_tf.generation import decode_step
    from opt_tf.modeling import KVCache

    model = opt_tf.TFOPTForCausalLM.from_pretrained(oracle_and_folder[1])
    step = tf.function(lambda tokens, mask, cache: decode_step(model, tokens, mask, cache)[0], jit_compile=True)
    empty, tokens = model.init_cache(2, 6), tf.constant([[5], [6]])
    hlo = []
    for index in (2, 4):
        mask = tf.constant(np.arange(6)[None, :].repeat(2, 0) <= index, tf.int32)
        cache = KVCache(empty.key_values, tf.constant(index))
        hlo.append(step.experimental_get_compiler_ir(tokens, mask, cache)(stage="hlo"))
    assert hlo[0] == hlo[1]


def test_sampled_distribution_follows_the_warped_probabilities():
    """Inverse-CDF draws from pre-drawn uniforms sample the warped distribution (a statistical check)."""
    from opt_core.generation import GenerationConfig, decode_options
    from opt_torch.generation import sample_from, warp_for_sampling

    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20000, 1)
    config = GenerationConfig(do_sample=True, top_k=3, temperature=0.7)
    warped = warp_for_sampling(scores, decode_options(config, 20000, 1, 40, stream=False))
    picks = sample_from(warped, torch.from_numpy(np.random.default_rng(0).random(20000, dtype=np.float32)))
    frequencies = np.bincount(picks.numpy(), minlength=5) / 20000
    expected = torch.softmax(warped[0], -1).numpy()
    assert frequencies[3] == frequencies[4] == 0
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_streamer_receives_prompt_then_each_token(generators, framework):
    received = []

    class Recorder:
        def put(self, value):
            received.append(np.asarray(value).reshape(-1).tolist())

        def end(self):
            received.append("end")

    ids = np.array([[2, 10, 11, 12]])
    out = generators[framework](ids, np.ones_like(ids), max_new_tokens=5, streamer=Recorder(), eos_token_id=None)
    assert received[0] == [2, 10, 11, 12] and received[-1] == "end"
    assert [r[0] for r in received[1:-1]] == out[0, 4:].tolist()


def test_stop_strings_stop_a_row():
    from opt_core.generation import hits_stop_string

    class CharTokenizer:
        def decode(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

    assert hits_stop_string(CharTokenizer(), [0, 1, 2], ["bc"])
    assert not hits_stop_string(CharTokenizer(), [0, 1, 2], ["ab"])


@pytest.mark.parametrize("framework", [fw for fw in FRAMEWORKS if fw != "torch"])
@pytest.mark.parametrize("strategy", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_stop_strings_equal_torch(generators, framework, strategy):
    class CharTokenizer:
        def decode(self, ids, **kwargs):
            return "".join(chr(ord("A") + i) for i in ids)

    ids, mask = sample_batch(seed=11, length=7)
    greedy = generators["torch"](ids, mask, max_new_tokens=10)
    stop = CharTokenizer().decode(greedy[1, 9:11].tolist())  # row 1 stops after its 4th new token
    beams = dict(num_beams=3) if strategy == "beam" else {}
    options = dict(max_new_tokens=10, stop_strings=[stop], tokenizer=CharTokenizer(), **beams)
    expected = generators["torch"](ids, mask, **options)
    np.testing.assert_array_equal(generators[framework](ids, mask, **options), expected)
    if strategy == "greedy":
        assert (expected[1, 11:] == 1).all()  # padded after the stop string


def test_generate_refuses_what_it_cannot_do(generators):
    ids, mask = sample_batch(seed=15, length=5)
    with pytest.raises(ConfigError, match="max_position_embeddings=40"):
        generators["torch"](ids, mask, max_new_tokens=50)
    with pytest.raises(TypeError, match="unknown options: max_tokens"):
        generators["torch"](ids, mask, max_tokens=5)
    with pytest.raises(ConfigError, match="num_return_sequences"):
        generators["torch"](ids, mask, max_new_tokens=3, num_return_sequences=2)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_ids(oracle_and_folder):
    import opt_torch

    _, folder = oracle_and_folder
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    ids, mask = sample_batch(seed=16, length=6)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, compile=True), eager)


GOLDEN = json.loads((Path(__file__).parent / "golden" / "contrastive_search.json").read_text())


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("variant", sorted(GOLDEN["variants"]))
def test_contrastive_search_equals_transformers_4_55(hf_checkpoint, framework, variant):
    """Golden ids from tests/golden/make_contrastive_golden.py, run with transformers 4.55 (the oracle)."""
    from golden.make_contrastive_golden import weights_checksum

    folder, hf = hf_checkpoint(variant)
    entry = GOLDEN["variants"][variant]
    assert abs(weights_checksum(hf) - entry["checksum"]) < 1e-6 * entry["checksum"]  # the same tiny model
    generate = load_generator(framework, folder)
    ids, mask = np.array(entry["input_ids"]), np.array(entry["attention_mask"])
    for name, case in entry.items():
        if isinstance(case, dict):
            np.testing.assert_array_equal(generate(ids, mask, **case["options"]), np.array(case["ids"]), err_msg=name)
