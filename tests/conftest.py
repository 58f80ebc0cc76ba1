"""Shared test harness: tiny configs covering every variant of the parameter table, and checkpoints that HF
transformers' PyTorch OPT (the oracle) writes once per session, in the real on-disk formats.

Every framework's tests load the same folders, so the three implementations are compared on identical weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled decoding programs go to a folder of this run (shared with the CLI subprocesses), not the user's cache.
os.environ.setdefault("OPT_LM_COMPILE_CACHE", tempfile.mkdtemp(prefix="opt-lm-compiled-"))

# The matrix of config variants (DESIGN.md section 6). Tiny so the whole suite stays fast.
BASE = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=48,
    num_attention_heads=4,
    max_position_embeddings=40,
    dropout=0.0,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
VARIANTS = {
    "pre_ln": {},
    "post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "no_bias": dict(enable_bias=False),
    "no_affine": dict(layer_norm_elementwise_affine=False),
    "untied": dict(tie_word_embeddings=False),
    "no_final_norm": dict(_remove_final_layer_norm=True),
}
HEADS = {
    "base": "OPTModel",
    "causal_lm": "OPTForCausalLM",
    "sequence_classification": "OPTForSequenceClassification",
    "question_answering": "OPTForQuestionAnswering",
}
FP32_ATOL = 1e-5  # DESIGN.md: logits of real tokens agree within 1e-5 in fp32


def variant_kwargs(variant: str) -> dict:
    return {**BASE, **VARIANTS[variant]}


def randomize_(model, seed: int) -> None:
    """Random values in every parameter (HF's init leaves biases 0 and norms 1, which would hide mistakes)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def make_hf_model(variant: str, head: str = "causal_lm", seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.OPTConfig(**variant_kwargs(variant), num_labels=3)
    model = getattr(transformers, HEADS[head])._from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    if head == "causal_lm" and config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session", params=["torch", "tf", "flax"])
def framework(request):
    """The adapter (`frameworks.py`) of one implementation; a test narrows the list with
    `@pytest.mark.parametrize("framework", [...], indirect=True)`."""
    from frameworks import ADAPTERS

    return ADAPTERS[request.param]()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(variant, head) -> folder HF transformers saved (safetensors, fp32), and the HF model.

    The HF model is shared by the whole session: never modify it (dtype, attention implementation, weights)
    without restoring it, or copy it first."""
    cache: dict = {}

    def get(variant: str, head: str = "causal_lm"):
        key = (variant, head)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{variant}_{head}")
            model = make_hf_model(variant, head)
            model.save_pretrained(folder)
            cache[key] = (Path(folder), model)
        return cache[key]

    return get


def sample_batch(seed: int = 0, batch: int = 3, length: int = 9, vocab: int = 101, pad_rows=(1, 2)):
    """Token ids and a left-padded mask: row r in pad_rows gets r * 2 padding tokens on the left."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for r in pad_rows:
        if r < batch:
            mask[r, : 2 * r] = 0
            ids[r, : 2 * r] = 1  # pad_token_id
    return ids, mask


def assert_close_on_real_tokens(actual, expected, mask, atol=FP32_ATOL, what="logits"):
    """Compares B T ... arrays at real-token positions only (padded positions are implementation-defined)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    real = np.asarray(mask).astype(bool)
    diff = np.abs(actual[real] - expected[real]).max() if real.any() else 0.0
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} on real tokens exceeds {atol}"
    return diff
