"""The checks every implementation passes the same way, each run on opt_torch, opt_tf and opt_flax through the
`framework` fixture (adapters in `frameworks.py`), against HF transformers' PyTorch OPT (the oracle): every config
variant and head, cached decoding, dtypes, checkpoints, bad input.

What only one framework has (torch's HF save format, Keras' h5 and `fit`, XLA, jit, Flax's params and mesh) stays in
`test_torch.py`, `test_tf.py` and `test_flax.py`.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
from conftest import HEADS, VARIANTS, assert_close_on_real_tokens, make_hf_model, sample_batch, variant_kwargs
from frameworks import TorchAdapter, main_output, torch_call

from opt_core.errors import InputError
from opt_core.formats import FORMATS

# Where cached decoding splits a 12-token batch: the points the per-framework copies of the test drew at random
# (np.random.default_rng(7); torch took three, TF and Flax two), all of them for every framework.
SPLITS = [6, 7, 8, 9]


def only(*names):
    """Runs a test on these frameworks only (the others lack what it checks)."""
    return pytest.mark.parametrize("framework", names, indirect=True)


def hf_output(hf, head, ids, mask):
    return main_output(torch_call(hf, ids, attention_mask=mask), head)


@contextlib.contextmanager
def hf_attention(hf, name):
    """Runs the shared HF model with attention implementation `name`, then restores whatever it had. HF's "sdpa"
    gives a pad slot zero attention, as ours, and so the same loss (a left-padded row's last pad slot predicts its
    first real token); only "eager" returns attention probabilities."""
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(name)
    try:
        yield
    finally:
        hf.set_attn_implementation(previous)


def assert_states_equal(actual: dict, expected: dict):
    """The same names, dtypes and bits."""
    assert set(actual) == set(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and np.array_equal(actual[name], array), name


def dtypes(state: dict) -> set[str]:
    return {array.dtype.name for array in state.values()}


@pytest.fixture(scope="module")
def loaded(framework, hf_checkpoint):
    """loaded(variant, head, attn) -> (the framework's model loaded from the folder HF wrote, the HF torch model)."""
    cache = {}

    def get(variant, head="causal_lm", attn=None):
        if (variant, head, attn) not in cache:
            folder, hf = hf_checkpoint(variant, head)
            cache[variant, head, attn] = (framework.load(folder, head, attn=attn), hf)
        return cache[variant, head, attn]

    return get


# ----- against the oracle


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head", HEADS)
def test_full_forward_left_padded_matches_hf(framework, loaded, variant, head):
    ours, hf = loaded(variant, head)
    ids, mask = sample_batch()
    actual = main_output(framework(ours, ids, attention_mask=mask), head)
    expected = hf_output(hf, head, ids, mask)
    if head == "sequence_classification":  # B C, pooled at each row's rightmost non-pad token (HF's rule)
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    else:
        assert_close_on_real_tokens(actual, expected, mask)


ATTENTION = [  # torch has two attention implementations, the others one
    pytest.param("torch", "sdpa", id="torch-sdpa"),
    pytest.param("torch", "eager", id="torch-eager"),
    pytest.param("tf", None, id="tf"),
    pytest.param("flax", None, id="flax"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("framework, attn", ATTENTION, indirect=["framework"])
def test_left_padded_rows_equal_rows_alone(framework, loaded, variant, attn):
    ours, _ = loaded(variant, attn=attn)
    ids, mask = sample_batch(seed=1)
    batched = np.asarray(framework(ours, ids, attention_mask=mask).logits)
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone = np.asarray(framework(ours, ids[row : row + 1, real]).logits)[0]
        np.testing.assert_allclose(batched[row, real], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_at_random_splits_with_holey_mask(framework, loaded, variant):
    """Prefill, then one token at a time, equals the full forward. torch and TF grow HF's tuple cache; Flax fills
    HF Flax's static cache, the mask over all its slots, with a jitted step."""
    fw = framework
    ours, hf = loaded(variant)
    ids, mask = sample_batch(seed=2, length=12)
    mask[0, 4:6] = 0  # a hole in the middle of a row, not just left padding
    full = np.asarray(fw(ours, ids, attention_mask=mask).logits)
    assert_close_on_real_tokens(full, hf_output(hf, "causal_lm", ids, mask), mask)
    step = fw.decode_step(ours)
    for split in SPLITS:
        cache = fw.start_cache(ours, *ids.shape)
        out = fw(ours, ids[:, :split], attention_mask=fw.cache_mask(mask, split), past_key_values=cache, use_cache=True)
        pieces, past = [np.asarray(out.logits)], out.past_key_values
        for t in range(split, ids.shape[1]):
            out = step(
                ids[:, t : t + 1], attention_mask=fw.cache_mask(mask, t + 1), past_key_values=past, use_cache=True
            )
            pieces.append(np.asarray(out.logits))
            past = out.past_key_values
        assert fw.cache_length(past) == ids.shape[1]
        assert_close_on_real_tokens(np.concatenate(pieces, axis=1), full, mask, what=f"split {split}")


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_final_norm"])
def test_hidden_states_and_attentions_match_hf(framework, loaded, variant):
    ours, hf = loaded(variant, attn="eager")
    ids, mask = sample_batch(seed=3)
    a = framework(ours, ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with hf_attention(hf, "eager"):
        e = torch_call(hf, ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(e.hidden_states) == ours.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, e.hidden_states):
        assert_close_on_real_tokens(x, y, mask, what="hidden_states")
    assert len(a.attentions) == len(e.attentions)
    for x, y in zip(a.attentions, e.attentions):
        real_queries = mask[:, None, :, None].astype(bool) & np.ones(x.shape, bool)
        np.testing.assert_allclose(np.asarray(x)[real_queries], np.asarray(y)[real_queries], atol=1e-6)


@only("torch", "tf")  # Flax models return no loss, as HF Flax's
@pytest.mark.parametrize("variant", ["pre_ln", "untied"])
def test_causal_lm_loss_matches_hf(framework, loaded, variant):
    ours, hf = loaded(variant)
    ids, mask = sample_batch(seed=4)
    labels = np.where(mask == 1, ids, -100)
    with hf_attention(hf, "sdpa"):
        expected = torch_call(hf, ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(float(framework(ours, ids, attention_mask=mask, labels=labels).loss) - expected) < 1e-5


@only("torch", "tf")
@pytest.mark.parametrize(
    "labels",
    [np.array([0, 2, 1]), np.array([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]], np.float32)],
    ids=["single_label", "multi_label"],
)
def test_sequence_classification_loss_matches_hf(framework, loaded, labels):
    ours, hf = loaded("pre_ln", "sequence_classification")
    ours.config.problem_type = hf.config.problem_type = None
    ids, mask = sample_batch(seed=5)
    with hf_attention(hf, "sdpa"):
        expected = torch_call(hf, ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(float(framework(ours, ids, attention_mask=mask, labels=labels).loss) - expected) < 1e-5
    ours.config.problem_type = hf.config.problem_type = None


@only("torch", "tf")
def test_question_answering_loss_matches_hf(framework, loaded):
    ours, hf = loaded("post_ln_proj", "question_answering")
    ids, mask = sample_batch(seed=6)
    spans = dict(start_positions=np.array([1, 4, 30]), end_positions=np.array([3, 8, 2]))  # 30: clamped, ignored
    with hf_attention(hf, "sdpa"):
        expected = torch_call(hf, ids, attention_mask=mask, **spans).loss.item()
    assert abs(float(framework(ours, ids, attention_mask=mask, **spans).loss) - expected) < 1e-5


def test_inputs_embeds_and_explicit_position_ids(framework, loaded):
    ours, hf = loaded("post_ln_proj")
    ids, mask = sample_batch(seed=8)
    embeds = torch_call(hf.get_input_embeddings(), ids).numpy()
    positions = np.clip(np.cumsum(mask, 1) * mask - 1, 0, None)
    expected = torch_call(hf, inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    actual = np.asarray(framework(ours, inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits)
    assert_close_on_real_tokens(actual, expected, mask)
    shifted = framework(ours, ids, attention_mask=mask, position_ids=positions + 1).logits  # honoured, not dropped
    assert not np.allclose(np.asarray(shifted), actual)


def test_dtype_options(framework, hf_checkpoint, tmp_path):
    fw = framework
    folder, hf = hf_checkpoint("pre_ln")
    ids, mask = sample_batch(seed=6)
    bf16 = fw.load(folder, **fw.bf16_compute)
    assert dtypes(fw.state(bf16)) == {fw.bf16_params}
    logits = fw.numpy(fw(bf16, ids, attention_mask=mask).logits)
    assert logits.dtype.name == "bfloat16"
    assert_close_on_real_tokens(logits, hf_output(hf, "causal_lm", ids, mask), mask, atol=0.1)
    make_hf_model("pre_ln").half().save_pretrained(tmp_path)  # an fp16 checkpoint, as on the Hub (the shared
    # oracle `hf` must not be touched: an fp16 round trip would change it for every later test)
    default = fw.load(tmp_path)  # float32 whatever the checkpoint stores
    assert dtypes(fw.state(default)) == {"float32"} and fw.numpy(fw(default, ids).logits).dtype.name == "float32"
    auto = fw.load(tmp_path, **fw.auto_dtype)  # the checkpoint's dtype
    assert dtypes(fw.state(auto)) == {"float16"} and fw.numpy(fw(auto, ids).logits).dtype.name == "float16"
    with pytest.raises(ValueError, match="unsupported dtype"):
        fw.load(folder, dtype="int8")


# ----- fresh init, checkpoints in every format, task heads


def test_fresh_init_is_hfs(framework):
    config = framework.package.OPTConfig(**variant_kwargs("untied"))
    state = framework.state(framework.fresh(config))
    layer = "model.decoder.layers.0."
    assert abs(float(np.std(state[layer + "fc1.weight"])) - config.init_std) < 0.005
    assert not np.any(state[layer + "fc1.bias"]) and np.all(state[layer + "final_layer_norm.weight"] == 1)
    assert state["lm_head.weight"].shape == (101, 32)  # V E, its own (untied)


@only("tf", "flax")  # torch writes safetensors and .bin only (test_torch.py)
@pytest.mark.parametrize("fmt", ["safetensors", "pytorch", "tf", "flax"])
@pytest.mark.parametrize("variant", ["post_ln_proj", "untied"])
def test_every_format_round_trips_bit_exact(framework, loaded, tmp_path, fmt, variant):
    ours, _ = loaded(variant)
    files = ours.save_pretrained(tmp_path, fmt=fmt, max_shard_size="8KB")
    assert (tmp_path / FORMATS[fmt].index_name) in files and len(files) > 2  # sharded
    state = framework.state(ours)
    assert_states_equal(framework.state(framework.load(tmp_path)), state)
    if fmt in ("safetensors", "pytorch"):  # the torch implementation reads them the same
        torch_impl = TorchAdapter()
        theirs = torch_impl.state(torch_impl.load(tmp_path))
        assert set(theirs) - {"lm_head.weight"} == set(state) - {"lm_head.weight"}  # torch lists a tied head
        assert_states_equal({k: v for k, v in theirs.items() if k in state}, state)


@only("tf", "flax")
@pytest.mark.parametrize("save_kwargs", [{}, {"fmt": "safetensors"}], ids=["own_format", "safetensors"])
@pytest.mark.parametrize("head", ["base", "sequence_classification", "question_answering"])
def test_head_models_round_trip_and_load_in_torch(framework, loaded, tmp_path, head, save_kwargs):
    ours, _ = loaded("post_ln_proj", head)
    ours.save_pretrained(tmp_path, **save_kwargs)
    assert_states_equal(framework.state(framework.load(tmp_path, head)), framework.state(ours))
    theirs = TorchAdapter().load(tmp_path, head)
    ids, mask = sample_batch(seed=12)
    actual, expected = main_output(framework(ours, ids, attention_mask=mask), head), hf_output(theirs, head, ids, mask)
    if head == "sequence_classification":
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    else:
        assert_close_on_real_tokens(actual, expected, mask)


def test_base_checkpoint_gives_fresh_task_head_with_warning(framework, hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln", "causal_lm")
    with pytest.warns(UserWarning, match="score.weight"):
        model = framework.load(folder, "sequence_classification", num_labels=4)
    score = framework.state(model)["score.weight"]
    assert score.shape == (4, 32) and model.config.num_labels == 4 and float(score.std()) > 0


def test_base_model_loads_from_head_checkpoint(framework, hf_checkpoint):
    folder, hf = hf_checkpoint("untied", "causal_lm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = framework.load(folder, "base")
    assert any("lm_head.weight" in str(w.message) for w in caught)
    ids, _ = sample_batch(pad_rows=())
    expected = torch_call(hf.model, ids).last_hidden_state
    np.testing.assert_allclose(framework(model, ids).last_hidden_state, expected, atol=1e-5, rtol=0)


# ----- bad input: clear errors naming the problem, before any compute


def test_bad_inputs_raise_clear_errors(framework, loaded):
    fw = framework
    ours, _ = loaded("pre_ln")
    with pytest.raises(InputError, match=r"token id 101 at position \(0, 2\) is out of range"):
        fw(ours, np.array([[5, 6, 101]]))
    with pytest.raises(InputError, match=r"token id -1"):
        fw(ours, np.array([[5, -1]]))
    with pytest.raises(InputError, match="must be integers"):
        fw(ours, np.array([[5.0, 6.0]]))
    with pytest.raises(InputError, match="max_position_embeddings=40"):
        fw(ours, np.full((1, 41), 5))
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 4\)"):
        fw(ours, np.array([[5, 6, 7]]), attention_mask=np.ones((1, 4)))
    with pytest.raises(InputError, match=r"attention_mask must hold only 0"):
        fw(ours, np.array([[5, 6, 7]]), attention_mask=np.full((1, 3), 2))
    with pytest.raises(InputError, match=r"position_ids has shape \(1, 2\)"):
        fw(ours, np.array([[5, 6, 7]]), position_ids=np.array([[0, 1]]))
    full = fw(ours, np.full((1, 40), 5), past_key_values=fw.start_cache(ours, 1, 41), use_cache=True)
    with pytest.raises(InputError, match="max_position_embeddings"):
        fw(ours, np.array([[5]]), past_key_values=full.past_key_values)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        fw(ours, None)


@only("tf", "flax")  # the static cache of init_cache
def test_bad_cache_inputs_raise_clear_errors(framework, loaded):
    ours, _ = loaded("pre_ln")
    cache = ours.init_cache(1, 4)
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 2\), but .*cache of 4 .*\(1, 4\)"):
        framework(ours, np.array([[5, 6]]), attention_mask=np.ones((1, 2)), past_key_values=cache)  # as HF Flax's
    with pytest.raises(InputError, match="cache was made for a batch of 1"):
        framework(ours, np.array([[5], [6]]), past_key_values=cache)
    out = framework(ours, np.array([[5, 6, 7]]), past_key_values=cache)
    with pytest.raises(InputError, match="no room for 2 more tokens"):
        framework(ours, np.array([[5, 6]]), past_key_values=out.past_key_values)
    big = ours.init_cache(1, 48)  # longer than the position table
    with pytest.raises(InputError, match="max_position_embeddings=40"):
        framework(ours, np.full((1, 41), 5), past_key_values=big)


def test_an_unknown_loading_option_is_refused_by_name(framework, hf_checkpoint):
    """HF keeps an unknown keyword as a config attribute; here it is refused, so a typo or an option this library
    lacks (HF's load_in_4bit) never loads silently into something else. (tp_plan and device_map:
    tests/test_bad_arguments.py.)"""
    folder, _ = hf_checkpoint("pre_ln")
    with pytest.raises(TypeError, match="load_in_4bit"):
        framework.load(folder, load_in_4bit=True)
    assert framework.load(folder, dropout=0.25).config.dropout == 0.25  # a config field is an override, as in HF
