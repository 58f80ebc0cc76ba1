"""pipeline("text-generation") in each framework against HF transformers' pipeline on the same folder."""

from __future__ import annotations

import builtins
import inspect

import pytest
import torch

from opt_core.pipeline import pipeline
from opt_core.tokenizer import train_bpe_tokenizer

FRAMEWORKS = ["pt", "flax", "tf"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random OPT with a tokenizer trained on the standard library's docstrings, saved HF-style."""
    import transformers

    folder = tmp_path_factory.mktemp("pipeline_model")
    texts = [inspect.getdoc(obj) for obj in vars(builtins).values() if inspect.getdoc(obj)]
    tokenizer = train_bpe_tokenizer(iter(texts), 400, folder)
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    transformers.OPTForCausalLM(config).save_pretrained(folder)
    return folder


def hf_pipeline(folder):
    import transformers

    return transformers.pipeline("text-generation", model=str(folder), tokenizer=str(folder))


PROMPTS = ["Return the absolute value", "Create a new"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("return_full_text", [True, False])
def test_single_prompt_equals_hf(model_folder, framework, return_full_text):
    ours = pipeline("text-generation", model=model_folder, framework=framework)
    expected = hf_pipeline(model_folder)(
        PROMPTS[0], max_new_tokens=8, do_sample=False, return_full_text=return_full_text
    )
    assert ours(PROMPTS[0], max_new_tokens=8, return_full_text=return_full_text) == expected


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_batched_prompts_equal_hf(model_folder, framework):
    ours = pipeline("text-generation", model=model_folder, framework=framework, batch_size=2)
    expected = hf_pipeline(model_folder)(PROMPTS, max_new_tokens=6, do_sample=False)
    assert ours(PROMPTS, max_new_tokens=6) == expected


def test_num_return_sequences_with_beams(model_folder):
    ours = pipeline("text-generation", model=model_folder, framework="pt")
    out = ours(PROMPTS[1], max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert len(out) == 2 and all(item["generated_text"].startswith(PROMPTS[1]) for item in out)


def test_bad_arguments(model_folder):
    with pytest.raises(ValueError, match="unsupported task"):
        pipeline("summarization", model=model_folder)
    with pytest.raises(ValueError, match="framework must be one of"):
        pipeline("text-generation", model=model_folder, framework="mxnet")
