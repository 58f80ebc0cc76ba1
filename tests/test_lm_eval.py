"""lm-evaluation-harness: the `opt-lm` backend (`opt_eval`) in each framework against lm_eval's own HF backend on
the same folder, `opt-lm score` against HF's rolling log-likelihood, and `opt-lm eval`.

The tasks are YAMLs in `tests/lm_eval_tasks/` over small local jsonl files (multiple choice, generation, perplexity);
the model is the embedded one, saved in float32 by this library. Both backends run with max_length=64, so the long
question is left-truncated and the long texts take several rolling windows. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["opt_lm_test_mc", "opt_lm_test_gen", "opt_lm_test_ppl"]
WINDOW = 64
LOGLIKELIHOOD_ATOL = 1e-4  # the bound; measured worst per request: torch 1.4e-5, tf 4.4e-5, flax 4.7e-5


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The embedded model and its tokenizer, saved in float32 by opt_torch."""
    from opt_cli.main import DEFAULT_MODEL
    from opt_core.tokenizer import OPTTokenizer
    from opt_torch import OPTForCausalLM

    folder = tmp_path_factory.mktemp("lm_eval_model")
    OPTForCausalLM.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    OPTTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def evaluate(model: str, model_args: dict, task_manager, tasks=TASKS, **options) -> dict:
    import lm_eval

    import opt_eval  # noqa: F401  registers `opt-lm`

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=task_manager, bootstrap_iters=0, **options
    )


@pytest.fixture(scope="module")
def hf_results(model_folder, task_manager) -> dict:
    """lm_eval's own HF backend, one request at a time (no padding): the oracle."""
    args = dict(pretrained=str(model_folder), max_length=WINDOW, dtype="float32", device="cpu")
    return evaluate("hf", args, task_manager, batch_size=1)


def compare_responses(expected: dict, actual: dict, tasks=TASKS) -> float:
    """Asserts every request's answer equal (strings, is_greedy flags; log-likelihoods within the bound) and
    returns the worst log-likelihood difference."""
    worst = 0.0
    for task in tasks:
        for doc_expected, doc_actual in zip(expected["samples"][task], actual["samples"][task], strict=True):
            for want, got in zip(doc_expected["resps"], doc_actual["resps"], strict=True):
                want, got = want[0], got[0]
                if isinstance(want, str):
                    assert got == want, f"{task} doc {doc_expected['doc_id']}: generated {got!r}, HF {want!r}"
                    continue
                if isinstance(want, (list, tuple)):  # loglikelihood: (log-likelihood, is_greedy)
                    assert bool(got[1]) == bool(want[1]), f"{task} doc {doc_expected['doc_id']}: is_greedy differs"
                    want, got = want[0], got[0]
                worst = max(worst, abs(float(got) - float(want)))
    assert worst <= LOGLIKELIHOOD_ATOL, f"worst per-request log-likelihood difference {worst:.3g}"
    return worst


def assert_same_metrics(expected: dict, actual: dict, tasks=TASKS) -> None:
    for task in tasks:
        want, got = expected["results"][task], actual["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in want:
                assert got[metric] == want[metric], f"{task} {metric}: {got[metric]} != HF's {want[metric]}"
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            if metric in want:
                assert got[metric] == pytest.approx(want[metric], rel=1e-5), f"{task} {metric}"


@pytest.mark.parametrize(
    "framework", ["torch", pytest.param("tf", marks=pytest.mark.slow), pytest.param("flax", marks=pytest.mark.slow)]
)
def test_backend_equals_lm_evals_hf_backend(framework, model_folder, task_manager, hf_results):
    """Per-request log-likelihoods within 1e-4, the same greedy flags, generated strings and accuracies, with
    batches of 4 (right-padded scoring, left-padded generation)."""
    args = dict(pretrained=str(model_folder), framework=framework, max_length=WINDOW, batch_size=4)
    ours = evaluate("opt-lm", args, task_manager)
    worst = compare_responses(hf_results, ours)
    assert_same_metrics(hf_results, ours)
    print(f"\n{framework}: worst per-request log-likelihood difference against lm_eval's HF backend {worst:.3g}")


@pytest.fixture(scope="module")
def lora_adapter(model_folder, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj) with random non-zero tensors, saved by PEFT."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_folder)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lm_eval_adapter")
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow  # HF + PEFT and a second lm_eval run: ~10 s
def test_adapter_equals_lm_evals_hf_backend_with_peft(model_folder, lora_adapter, task_manager, hf_results):
    """adapter= gives what lm_eval's HF backend gives with peft= (the same adapter over the same base), on the
    first 4 documents of the scoring tasks; the adapter changes the scores."""
    tasks = ["opt_lm_test_mc", "opt_lm_test_ppl"]
    hf_args = dict(pretrained=str(model_folder), peft=str(lora_adapter), max_length=WINDOW, device="cpu")
    expected = evaluate("hf", dict(hf_args, dtype="float32"), task_manager, tasks, batch_size=1, limit=4)
    args = dict(pretrained=str(model_folder), adapter=str(lora_adapter), max_length=WINDOW, batch_size=4)
    ours = evaluate("opt-lm", args, task_manager, tasks, limit=4)
    compare_responses(expected, ours, tasks)
    assert_same_metrics(expected, ours, tasks)
    with_adapter = [r[0] for sample in ours["samples"]["opt_lm_test_ppl"] for r in sample["resps"]]
    without = [r[0] for sample in hf_results["samples"]["opt_lm_test_ppl"][:4] for r in sample["resps"]]
    assert np.abs(np.array(with_adapter) - np.array(without)).max() > 1e-2


def test_int8_model_scores_close_to_the_float_model(model_folder, hf_results):
    """quantize=int8 (torch): each multiple-choice request within 0.1 nats of HF's float32 log-likelihood (measured
    worst 0.054 on this model) and the same choice picked for every question."""
    from lm_eval.api.instance import Instance

    from opt_eval import OPTLM

    lm = OPTLM(pretrained=str(model_folder), quantize="int8", max_length=WINDOW, batch_size=4)
    for sample in hf_results["samples"]["opt_lm_test_mc"]:
        requests = [Instance("loglikelihood", {}, tuple(args), 0) for args in sample["arguments"]]
        got = np.array([answer[0] for answer in lm.loglikelihood(requests, disable_tqdm=True)])
        expected = np.array([response[0][0] for response in sample["resps"]])
        assert np.abs(got - expected).max() < 0.1
        assert got.argmax() == expected.argmax()


def test_sampled_generation_honours_until_max_gen_toks_and_the_seed(model_folder, hf_results):
    """do_sample with a temperature: at most max_gen_toks tokens, cut before the first stop string, the same text
    for the same seed, and not the greedy text everywhere."""
    from lm_eval.api.instance import Instance

    from opt_eval import OPTLM

    options = {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": True, "temperature": 1.5}
    samples = hf_results["samples"]["opt_lm_test_gen"]
    requests = [Instance("generate_until", {}, (sample["arguments"][0][0], options), 0) for sample in samples]
    lm, texts = OPTLM(pretrained=str(model_folder), batch_size=6), []
    for seed in (1, 1, 2):
        lm.seed = seed
        texts.append(lm.generate_until(requests, disable_tqdm=True))
    assert texts[0] == texts[1] and texts[0] != texts[2]
    for text in texts[0]:
        assert "\n" not in text and "." not in text and len(lm.tok_encode(text, add_special_tokens=False)) <= 8
    assert texts[0] != [sample["resps"][0][0] for sample in samples]


def test_a_stop_string_that_starts_in_the_prompt_does_not_stop_generation(model_folder):
    """HFLM looks for `until` in the new text only: "return x" after the prompt "...return" and the new " x" stops
    nothing there, so neither may the backend (its generate stops on prompt + new text; the row is redone)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from opt_eval import OPTLM

    options = {"until": ["return x", "\n"], "max_gen_toks": 12, "do_sample": False}
    requests = [
        Instance("generate_until", {}, (prompt, options), 0) for prompt in ("def add(a, b):\n    return", "A list")
    ]
    hf = HFLM(pretrained=str(model_folder), max_length=WINDOW, dtype="float32", device="cpu")
    expected = hf.generate_until(requests, disable_tqdm=True)
    assert expected[0].startswith(" x") and len(expected[0]) > 2  # the embedded model's greedy text goes on
    assert (
        OPTLM(pretrained=str(model_folder), max_length=WINDOW, batch_size=2).generate_until(requests, True) == expected
    )


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_scoring_in_every_framework_equals_lm_evals_hf_backend(framework, model_folder, hf_results):
    """The fast check of Keras and Flax (the whole run is slow for them): the oracle's loglikelihood and rolling
    requests, sent straight to the backend, get HF's log-likelihoods and greedy flags."""
    from lm_eval.api.instance import Instance

    from opt_eval import OPTLM

    lm = OPTLM(pretrained=str(model_folder), framework=framework, max_length=WINDOW, batch_size=4)
    for task, kind in (("opt_lm_test_mc", "loglikelihood"), ("opt_lm_test_ppl", "loglikelihood_rolling")):
        samples = hf_results["samples"][task]
        requests = [Instance(kind, {}, tuple(args), 0) for sample in samples for args in sample["arguments"]]
        expected = [response[0] for sample in samples for response in sample["resps"]]
        got = getattr(lm, kind)(requests, disable_tqdm=True)
        if kind == "loglikelihood":
            assert [g[1] for g in got] == [e[1] for e in expected], f"{task}: is_greedy differs"
            got, expected = [g[0] for g in got], [e[0] for e in expected]
        worst = np.abs(np.array(got) - np.array(expected, dtype=np.float64)).max()
        assert worst <= LOGLIKELIHOOD_ATOL, f"{framework} {task}: worst log-likelihood difference {worst:.3g}"


def test_requests_actually_cover_truncation_windows_and_stops(hf_results):
    """The oracle's run exercises what the backend must reproduce: a context longer than the window, texts of
    several windows, an empty context, generations cut at a stop string, and accuracies that are not trivial."""
    from opt_cli.main import DEFAULT_MODEL
    from opt_core.scoring import rolling_windows
    from opt_core.tokenizer import OPTTokenizer

    tokenizer = OPTTokenizer.from_pretrained(DEFAULT_MODEL)
    questions = [sample["doc"]["question"] for sample in hf_results["samples"]["opt_lm_test_mc"]]
    assert "" in questions and max(len(tokenizer.encode(q)) for q in questions) > WINDOW
    texts = [sample["doc"]["text"] for sample in hf_results["samples"]["opt_lm_test_ppl"]]
    assert max(len(rolling_windows(tokenizer.encode(t), 2, WINDOW)) for t in texts) >= 3
    generated = [sample["resps"][0][0] for sample in hf_results["samples"]["opt_lm_test_gen"]]
    assert len(set(generated)) > 3 and all("\n" not in g and "." not in g for g in generated)
    assert 0 < hf_results["results"]["opt_lm_test_mc"]["acc,none"] < 1
    assert 0 < hf_results["results"]["opt_lm_test_gen"]["exact_match,none"] < 1


@pytest.mark.parametrize("count", [0, 1, 2, 5, 63, 64, 65, 128, 130, 200])
@pytest.mark.parametrize("window", [1, 2, 7, 64])
def test_rolling_windows_are_lm_evals(count, window):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from opt_core.scoring import rolling_windows

    ids = list(range(10, 10 + count))
    expected = [make_disjoint_window(pair) for pair in get_rolling_token_windows(ids, 2, window, 1)]
    assert rolling_windows(ids, 2, window) == [(list(a), list(b)) for a, b in expected]


def test_score_equals_lm_evals_rolling_log_likelihood(model_folder, hf_results, tmp_path, capsys):
    """`opt-lm score --window 64` gives each text HF's per-document log-likelihood (leading </s> scored, rolling
    windows); without --window it uses the model's 256 positions, as HFLM does without max_length."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from opt_cli.main import main

    def score(text: str, *options: str) -> dict:
        path = tmp_path / "text.txt"
        path.write_text(text, encoding="utf-8")
        assert main(["score", str(path), "--model", str(model_folder), "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)

    for sample in hf_results["samples"]["opt_lm_test_ppl"]:
        if len(sample["doc"]["text"]) < 200:  # the texts of several windows suffice
            continue
        result = score(sample["doc"]["text"], "--window", str(WINDOW))
        assert result["windows"] >= 2
        assert abs(result["log_likelihood"] - sample["resps"][0][0]) <= LOGLIKELIHOOD_ATOL
    long_text = " ".join(sample["doc"]["text"] for sample in hf_results["samples"]["opt_lm_test_ppl"]) * 2
    hf = HFLM(pretrained=str(model_folder), dtype="float32", device="cpu", batch_size=1)
    (expected,) = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)], True)
    result = score(long_text)
    assert result["window"] == 256 and result["windows"] >= 2
    assert abs(result["log_likelihood"] - expected) <= LOGLIKELIHOOD_ATOL
    assert result["perplexity"] == pytest.approx(np.exp(-expected / result["tokens"]), rel=1e-6)


def test_eval_command_prints_lm_evals_table(model_folder, hf_results, capsys):
    """`opt-lm eval` runs simple_evaluate with the opt-lm backend and prints lm_eval's table: the accuracy of the
    first 3 documents is HF's on them."""
    from opt_cli.main import main

    argv = ["eval", str(model_folder), "--tasks", "opt_lm_test_mc", "--include-path", str(TASKS_DIR)]
    assert main([*argv, "--limit", "3", "--max-length", str(WINDOW), "--batch-size", "2"]) == 0
    table = capsys.readouterr().out
    hf_accuracy = np.mean([sample["acc"] for sample in hf_results["samples"]["opt_lm_test_mc"][:3]])
    row = next(line for line in table.splitlines() if "opt_lm_test_mc" in line and "|acc " in line)
    assert "Tasks" in table.splitlines()[0]
    assert float(row.split("|")[7]) == pytest.approx(hf_accuracy, abs=1e-4)


@pytest.mark.parametrize(
    "arguments, named",
    [
        (dict(framework="jax"), "framework"),
        (dict(framework="tf", quantize="int8"), "quantize"),
        (dict(quantize="int4"), "quantize"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size="auto"), "batch_size"),
        (dict(max_length=10_000), "max_length"),
        (dict(temperature=0.5), "temperature"),
        (dict(pretrained="/no/such/model"), "/no/such/model"),
    ],
)
def test_backend_refuses_bad_model_arguments(arguments, named):
    from opt_core.errors import ConfigError, OPTError
    from opt_eval import OPTLM

    with pytest.raises(OPTError, match=named) as raised:
        OPTLM(**arguments)
    assert isinstance(raised.value, (ConfigError, OPTError))


@pytest.mark.parametrize(
    "argv, named",
    [
        pytest.param(  # looking a name up in lm_eval's own 14,000 tasks takes ~10 s of indexing
            ["--tasks", "no_such_task_xyz", "--include-path", str(TASKS_DIR)],
            "no_such_task_xyz",
            marks=pytest.mark.slow,
        ),
        (["--tasks", "opt_lm_test_mc", "--framework", "flax", "--quantize", "int8"], "--quantize"),
        (["--tasks", "opt_lm_test_mc", "--include-path", "/no/such/folder"], "/no/such/folder"),
        (["/no/such/model", "--tasks", "opt_lm_test_mc", "--include-path", str(TASKS_DIR)], "/no/such/model"),
        (["--tasks", "opt_lm_test_mc", "--limit", "1.5"], "--limit"),
        (["--tasks", ","], "--tasks"),
    ],
)
def test_eval_command_refuses_bad_input(argv, named, capsys):
    from opt_cli.main import main

    try:
        status = main(["eval", *argv])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    assert status == 2
    assert named in capsys.readouterr().err


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_backend(model_folder):
    """`python -m opt_eval` is lm_eval's command line with `--model opt-lm` available."""
    import subprocess
    import sys

    args = f"pretrained={model_folder},max_length={WINDOW}"
    command = [sys.executable, "-m", "opt_eval", "--model", "opt-lm", "--model_args", args]
    command += ["--tasks", "opt_lm_test_mc", "--include_path", str(TASKS_DIR), "--limit", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opt_lm_test_mc" in result.stdout and "acc" in result.stdout
