"""`opt-lm` end to end, in subprocesses as a user runs it: generate in each framework on the embedded model, info,
score, convert, and a short `train` whose output loads in all three frameworks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opt_cli.main import DEFAULT_MODEL

PROMPT = "Plants create energy through a process known as photosynthesis."


def opt_lm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    return subprocess.run(
        [sys.executable, "-m", "opt_cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_embedded_model_is_small_and_complete():
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) <= 8 * 2**20


@pytest.fixture(scope="module")
def torch_continuation():
    result = opt_lm("generate", PROMPT, "--framework", "torch", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_streams_a_readable_continuation(torch_continuation):
    assert torch_continuation.startswith(PROMPT)
    continuation = torch_continuation[len(PROMPT) :]
    words = continuation.split()
    assert len(words) >= 8, continuation
    # Readable: mostly alphabetic words, not byte soup.
    assert sum(w.strip(".,;:()'\"").isalpha() for w in words) >= 0.6 * len(words), continuation


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_generate_in_each_framework_gives_the_same_text(torch_continuation, framework):
    result = opt_lm("generate", PROMPT, "--framework", framework, "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == torch_continuation
    # stderr holds our status line only: no native log lines from TensorFlow or XLA (oneDNN, cuda stubs, absl)
    assert result.stderr.splitlines() == [f"loading {DEFAULT_MODEL} ({framework})"], result.stderr


def test_info_reports_config_and_formats():
    result = opt_lm("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] > 1_000_000 and info["formats"]["safetensors"]["dtypes"] == ["float16"]


def test_score_gives_a_perplexity(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Return the absolute value of the argument.\n" * 3)
    result = opt_lm("score", str(text), "--json", "--framework", "torch")
    assert result.returncode == 0, result.stderr
    score = json.loads(result.stdout)
    assert score["tokens"] > 20 and 1 < score["perplexity"] < 1000


def test_convert_through_the_cli(tmp_path):
    result = opt_lm("convert", str(DEFAULT_MODEL), str(tmp_path / "flax"), "--to", "flax")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "flax" / "flax_model.msgpack").is_file() and (tmp_path / "flax" / "vocab.json").is_file()


def test_offline_hub_id_is_a_clear_error(tmp_path):
    result = opt_lm("info", "facebook/opt-125m")
    assert result.returncode == 2
    assert "config.json of 'facebook/opt-125m'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_short_training_run_lowers_the_loss_and_loads_everywhere(tmp_path, framework):
    corpus = tmp_path / "corpus.txt"
    sentences = ["The function returns the value.", "A module holds functions and classes.", "Return a new list."]
    corpus.write_text("\n".join(sentences[i % 3] for i in range(600)))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=64,
                max_position_embeddings=64,
                dropout=0.0,
            )
        )
    )
    out = tmp_path / "model"
    args = [
        "train",
        "--framework",
        framework,
        "--train-files",
        str(corpus),
        "--output",
        str(out),
        "--config",
        str(config),
        "--vocab-size",
        "300",
        "--steps",
        "60",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--eval-every",
        "20",
        "--warmup-steps",
        "5",
        "--learning-rate",
        "3e-3",
    ]
    result = opt_lm(*args)
    assert result.returncode == 0, result.stderr
    evals = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    perplexities = [e["perplexity"] for e in evals if e["event"] == "eval"]
    assert perplexities[-1] < 0.5 * perplexities[0], perplexities
    logits = {fw: _logits(fw, out) for fw in ("torch", "tf", "flax")}
    np.testing.assert_allclose(logits["tf"], logits["torch"], atol=1e-4)
    np.testing.assert_allclose(logits["flax"], logits["torch"], atol=1e-4)


def _logits(framework: str, folder: Path) -> np.ndarray:
    from opt_cli.frameworks import load_causal_lm

    ids = np.array([[2, 10, 20, 30, 40]])
    return load_causal_lm(framework, folder).logits(ids, np.ones_like(ids))
