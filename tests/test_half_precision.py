"""float16 and bfloat16 on the case of HF transformers' issue #17433: a left-padded batch with a long prompt, where
HF's OPT in float16 produced NaN. Every framework, prefill and decode steps (dynamic and static caches), `generate`.

The hazard (`opt_core.masks`): a padded query may attend to nothing, so its whole row of scores is masked. Adding
the mask to the scores in float16 (`score + finfo(float16).min`) rounds to -inf once a score is below -16; a row of
-inf softmaxes to NaN, and the next layer's `probs @ v` carries it (0 * NaN) into every real token of the row.

The model: the tiny test config with four layers, a 64-position table, q_proj and k_proj scaled by 10 so that scores
reach about +-180, and out_proj scaled by 0.3. Scores that large make attention nearly one-hot, so a half-precision
rounding of a score (about 0.4 in bfloat16) moves a probability by tens of percent; the smaller out_proj damps what
reaches the logits, so that greedy ids can be compared over several tokens while the scores keep their size.
The batch: a 56-token prompt (8 new tokens fill the 64-position table), rows left-padded by 0, 28 and 53 tokens.
In its mostly padded row a head of the third layer scores every slot a padded query sees below -16:
`test_an_additive_mask_would_give_nan` shows HF's additive mask turning the row's real logits to NaN there.

fp32 is the reference: HF transformers' fp32 logits, and our fp32 greedy ids (equal to HF's, `test_generation.py`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import BASE, randomize_

from opt_core.masks import MASKED_SCORE

PROMPT, NEW_TOKENS = 56, 8  # prompt + new tokens = max_position_embeddings: every position of the table is used
PADDING = (0, 28, 53)  # left padding per row: a full row, a half row, a row of 3 real tokens
QK_SCALE = 10.0  # on q_proj and k_proj: scores reach about +-180
OUT_SCALE = 0.3  # on out_proj: see the module docstring
# The prompt's draw, chosen among seeds 0-399 as one whose additive-mask witness gives NaN and whose first six fp32
# greedy steps keep the widest top-two margins against half precision's errors (see GREEDY_STEPS).
PROMPT_SEED = 328
CONFIG = dict(BASE, num_hidden_layers=4, ffn_dim=64, max_position_embeddings=PROMPT + NEW_TOKENS)
HALF = ["float16", "bfloat16"]
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# Measured (max abs difference to fp32 over real tokens; fp32 logits span about +-2), worst of the frameworks:
# float16 prefill 0.056 (TF), decode 0.017; bfloat16 prefill 0.32 (TF; torch 0.13), decode 0.16. About 2-3x room.
LOGITS_ATOL = {"float16": 0.15, "bfloat16": 0.6}
# Greedy ids are compared over the first GREEDY_STEPS new tokens: there the fp32 top-two margin is at least 0.064
# (row 0, second token), and in half precision the fp32 choice still leads by at least 0.062 in every framework and
# dtype (measured). The 7th token's fp32 margin is 0.001 (row 1): any rounding may pick either, and bfloat16 torch
# does pick the other.
GREEDY_STEPS = 6


def to_numpy(x) -> np.ndarray:
    """A torch, TF or JAX array (any float dtype) as float32 numpy."""
    if isinstance(x, torch.Tensor):
        return x.float().numpy()
    if hasattr(x, "numpy") and not hasattr(x, "block_until_ready"):  # a TF tensor
        import tensorflow as tf

        return tf.cast(x, tf.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def stress_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(PROMPT_SEED)
    ids = rng.integers(3, CONFIG["vocab_size"], size=(len(PADDING), PROMPT)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, pads in enumerate(PADDING):
        ids[row, :pads], mask[row, :pads] = CONFIG["pad_token_id"], 0
    return ids, mask


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    """A dict: the checkpoint `folder`, the batch (`ids`, `mask`), HF's fp32 `logits` (B T V), our fp32 `greedy`
    continuation (B NEW_TOKENS) and HF's fp32 logits for each new token, `steps` (B NEW_TOKENS V, from the full
    forward over prompt + continuation)."""
    import transformers

    import opt_torch

    torch.manual_seed(0)
    config = transformers.OPTConfig(**CONFIG)
    hf = transformers.OPTForCausalLM._from_config(config, attn_implementation="eager")
    randomize_(hf, 0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                param.mul_(QK_SCALE)
            elif ".out_proj." in name:
                param.mul_(OUT_SCALE)
    hf.tie_weights()
    hf.eval()
    folder = tmp_path_factory.mktemp("half_precision")
    hf.save_pretrained(folder)
    ids, mask = stress_batch()
    ours = opt_torch.OPTForCausalLM.from_pretrained(folder)
    greedy = ours.generate(
        torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS, eos_token_id=None
    ).numpy()[:, PROMPT:]
    full_mask = np.concatenate([mask, np.ones_like(greedy)], axis=1)
    with torch.no_grad():
        logits = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        full = hf(torch.from_numpy(np.concatenate([ids, greedy], 1)), attention_mask=torch.from_numpy(full_mask))
    steps = full.logits.numpy()[:, PROMPT - 1 : -1]
    return dict(folder=folder, ids=ids, mask=mask, logits=logits, greedy=greedy, steps=steps)


def test_the_fp32_reference_is_finite_and_its_compared_steps_have_margins(stress):
    """What the comparisons below stand on (the stress itself: `test_an_additive_mask_would_give_nan`)."""
    top2 = np.sort(stress["steps"], axis=-1)[..., -2:]
    margins = top2[..., 1] - top2[..., 0]  # B NEW_TOKENS
    assert margins[:, :GREEDY_STEPS].min() > 0.05, margins
    assert np.isfinite(stress["logits"]).all()


# ----- the models in half precision: one per (framework, dtype), loaded once


def load(framework: str, folder, dtype: str):
    if framework.startswith("torch"):
        import opt_torch

        attn = "eager" if framework == "torch_eager" else "sdpa"
        return opt_torch.OPTForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation=attn)
    if framework == "tf":
        import opt_tf

        return opt_tf.TFOPTForCausalLM.from_pretrained(folder, dtype=dtype)  # Keras' policy: variables in dtype too
    import opt_flax

    return opt_flax.FlaxOPTForCausalLM.from_pretrained(folder, dtype=dtype, param_dtype=dtype)


@pytest.fixture(scope="module")
def half_model(stress):
    models = {}

    def get(framework: str, dtype: str):
        if (framework, dtype) not in models:
            models[framework, dtype] = load(framework, stress["folder"], dtype)
        return models[framework, dtype]

    return get


JITTED = {}  # id(model) -> (model, jax.jit(model.__call__)): one compilation per model and input shape


def jitted(model):
    import jax

    if id(model) not in JITTED:
        JITTED[id(model)] = (model, jax.jit(model.__call__))
    return JITTED[id(model)][1]


def forward(framework: str, model, ids, mask, **kwargs):
    """One call on numpy inputs: (logits as float32 numpy, the returned cache)."""
    if framework.startswith("torch"):
        kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
        with torch.no_grad():
            out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
    elif framework == "flax":
        kwargs.pop("use_cache", None)  # as HF Flax: a cache passed in comes back updated
        out = jitted(model)(ids, attention_mask=mask, params=model.params, **kwargs)
    else:
        out = model(ids, attention_mask=mask, **kwargs)
    return to_numpy(out.logits), out.past_key_values


FRAMEWORKS = ["torch", "torch_eager", "tf", "flax"]  # torch_eager: the explicit softmax instead of torch's SDPA
# HF's tuple cache (torch, TF: the mask over the tokens so far) and the static one (init_cache: the mask over all
# its slots); Flax has only the static one, as HF Flax.
CACHES = [(fw, cache) for fw in FRAMEWORKS for cache in ("dynamic", "static") if (fw, cache) != ("flax", "dynamic")]


def prefill_and_decode(framework: str, model, stress, cache: str) -> tuple[np.ndarray, np.ndarray]:
    """The prompt through the cache, then the fp32 continuation one token at a time: the prefill's logits (B T V)
    and the logits each call gives for the next token (B NEW_TOKENS V)."""
    ids, tokens = stress["ids"], stress["greedy"]
    mask = np.concatenate([stress["mask"], np.ones_like(tokens)], axis=1)  # B S: the prompt's, then the new tokens'
    slots = mask.shape[1]
    past = model.init_cache(len(ids), slots) if cache == "static" else None
    calls = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, slots - 1)]  # the slots each call writes
    prefill, steps = None, []
    for start, end in calls:
        new = ids if start == 0 else tokens[:, start - PROMPT : end - PROMPT]
        extra = {}
        if cache == "static":
            call_mask = np.where(np.arange(slots) < end, mask, 0)  # slots not written yet are 0
            if framework.startswith("torch"):
                extra["cache_position"] = np.arange(start, end)
        else:
            call_mask = mask[:, :end]
        logits, past = forward(framework, model, new, call_mask, past_key_values=past, use_cache=True, **extra)
        prefill = logits if prefill is None else prefill
        steps.append(logits[:, -1])
    return prefill, np.stack(steps, axis=1)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("framework, cache", CACHES)
def test_prefill_and_decode_steps_are_finite_and_follow_fp32(stress, half_model, framework, cache, dtype):
    prefill, steps = prefill_and_decode(framework, half_model(framework, dtype), stress, cache)
    bad = np.argwhere(~np.isfinite(prefill))
    assert not len(bad), f"non-finite prefill logits at (row, position, id) {bad[:3].tolist()}, padded ones included"
    real = stress["mask"].astype(bool)
    diff = np.abs(prefill[real] - stress["logits"][real]).max()
    assert diff < LOGITS_ATOL[dtype], f"prefill: {diff:.3g} from fp32"
    assert np.isfinite(steps).all(), "non-finite decode logits"
    diff = np.abs(steps - stress["steps"]).max()
    assert diff < LOGITS_ATOL[dtype], f"decode: {diff:.3g} from fp32"
    np.testing.assert_array_equal(steps.argmax(-1)[:, :GREEDY_STEPS], stress["greedy"][:, :GREEDY_STEPS])


# generate compiles its loop in TF (XLA) and Flax (jax.jit): 4-10 s a dtype. float16, #17433's dtype, runs always.
GENERATE = [
    pytest.param(
        fw, dtype, marks=[pytest.mark.slow] if (fw, dtype) in {("tf", "bfloat16"), ("flax", "bfloat16")} else []
    )
    for fw in ("torch", "tf", "flax")
    for dtype in HALF
]


@pytest.mark.parametrize("framework, dtype", GENERATE)
def test_generate_greedy_ids_equal_fp32(stress, half_model, framework, dtype):
    model = half_model(framework, dtype)
    ids, mask = stress["ids"], stress["mask"]
    kwargs = dict(max_new_tokens=GREEDY_STEPS, eos_token_id=None)
    if framework == "torch":
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs).numpy()
    else:
        out = np.asarray(model.generate(ids, attention_mask=mask, **kwargs))
    np.testing.assert_array_equal(out[:, PROMPT:], stress["greedy"][:, :GREEDY_STEPS])


def test_an_additive_mask_would_give_nan(stress, monkeypatch):
    """The witness that this batch is #17433's case: with HF's additive mask in float16 (`scores + finfo.min`, then
    the float32 softmax) the same model gives NaN logits at real tokens of the mostly padded row."""
    import opt_torch.modeling

    def additive(scores, mask):
        addend = torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        return torch.softmax((scores + addend).float(), dim=-1).to(scores.dtype)

    model = load("torch_eager", stress["folder"], "float16")
    monkeypatch.setattr(opt_torch.modeling, "masked_softmax", additive)
    logits, _ = forward("torch_eager", model, stress["ids"], stress["mask"])
    real = stress["mask"].astype(bool)
    assert np.isnan(logits[real]).any()


# ----- the masked softmax alone, swept over the large negatives a mask or a score can hold


def masked_softmax(framework: str):
    """The framework's `masked_softmax(scores, mask)` on numpy inputs (scores in any of NP_DTYPES)."""
    if framework == "torch":
        from opt_torch.modeling import masked_softmax as fn

        def convert(x):
            if x.dtype == ml_dtypes.bfloat16:
                return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(x)

    elif framework == "tf":
        import tensorflow as tf

        from opt_tf.modeling import masked_softmax as fn

        def convert(x):
            if x.dtype == ml_dtypes.bfloat16:  # exact: the values are bfloat16's
                return tf.cast(tf.constant(x.astype(np.float32)), tf.bfloat16)
            return tf.constant(x)

    else:
        import jax.numpy as jnp

        from opt_flax.modeling import masked_softmax as fn

        convert = jnp.asarray
    return lambda scores, mask: fn(convert(scores), convert(mask))


# The large negatives in play, as scores already in a row: each half dtype's minimum (the fill an additive mask uses;
# float32's is ours, `MASKED_SCORE`, not swept: see the last test) and the hand-picked fills of other code: -1e4
# (BERT-era masks), -1e8 (HF's TF models), -1e9 (HF's Flax OPT since #21150). Each where its dtype holds it.
LARGE_NEGATIVES = {
    "float16.min": float(np.finfo(np.float16).min),
    "bfloat16.min": float(ml_dtypes.finfo(ml_dtypes.bfloat16).min),
    "-1e4": -1e4,
    "-1e8": -1e8,
    "-1e9": -1e9,
}


def sweep_cases():
    for dtype, np_dtype in NP_DTYPES.items():
        for name, value in LARGE_NEGATIVES.items():
            with np.errstate(over="ignore"):  # -1e9 overflows float16: such a score cannot exist, so no case
                fits = np.isfinite(np.asarray(value, np_dtype))
            if fits:
                yield pytest.param(dtype, value, id=f"{dtype}-{name}")


def sweep_inputs(dtype: str, value: float) -> tuple[np.ndarray, np.ndarray]:
    """1 1 T S scores and mask. Row 0: real scores at `value` beside masked ones (the old fill would tie with the
    real scores and take half the mass); row 1: a real score of 0 beside `value`, both real; row 2: nothing to attend
    to (a padded query); row 3: the dtype's largest and `value`, real, masked slots between."""
    np_dtype, top = NP_DTYPES[dtype], float(ml_dtypes.finfo(NP_DTYPES[dtype]).max)
    scores = np.array(
        [
            [value, value, -5.0, 7.0, value],
            [0.0, value, 3.0, value, value],
            [value, -20.0, 9.0, value, 0.0],
            [top, value, value, 1.0, value],
        ]
    ).astype(np_dtype)
    mask = np.array(
        [
            [True, True, False, False, False],
            [True, True, False, False, False],
            [False, False, False, False, False],
            [True, True, False, True, True],
        ]
    )
    return scores[None, None], mask[None, None]


def reference(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 softmax over the real slots; 0 at masked slots and in rows with nothing to attend to."""
    scores = scores.astype(np.float64)
    shifted = np.where(mask, scores - np.where(mask, scores, -np.inf).max(-1, keepdims=True), -np.inf)
    exp = np.where(mask, np.exp(shifted), 0.0)
    total = exp.sum(-1, keepdims=True)
    return np.divide(exp, total, out=np.zeros_like(exp), where=total > 0)


@pytest.mark.parametrize("dtype, value", list(sweep_cases()))
@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_masked_softmax_sweep(framework, dtype, value):
    scores, mask = sweep_inputs(dtype, value)
    probs = to_numpy(masked_softmax(framework)(scores, mask))
    assert np.isfinite(probs).all(), probs
    assert not probs[~mask].any(), "a masked slot or a query with nothing to attend to got attention"
    expected = reference(scores, mask)
    tolerance = float(ml_dtypes.finfo(NP_DTYPES[dtype]).eps)
    np.testing.assert_allclose(probs, expected, atol=tolerance, rtol=0)


def test_the_fill_is_below_every_half_precision_score():
    """The fill is float32's minimum, applied after the upcast: no float16 or bfloat16 score can reach it, and
    float32's own minimum is the fill (a real fp32 score there would need |q| |k| of about 1e38)."""
    assert float(np.finfo(np.float32).min) == MASKED_SCORE
    for dtype in HALF:
        assert float(ml_dtypes.finfo(NP_DTYPES[dtype]).min) > MASKED_SCORE
