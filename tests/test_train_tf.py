"""Training in Keras (`opt_tf.train`, issue 16): per-step losses equal a reference loop written here with HF
transformers' PyTorch OPT and `torch.optim.AdamW` (HF Trainer's parameter groups, warmup + linear decay, clipping,
dropout off, fp32, the same batches) over 50 steps for each task; the final folder loads in HF with the same logits;
a killed and resumed run gives the losses of an uninterrupted one; accumulation equals one big batch."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE, FP32_ATOL, randomize_

from opt_core.data import batch_indices
from opt_core.training import LOG_NAME, STATE_NAME, TextRows, TrainOptions, decays, load_data, run_training

PARITY_STEPS = 50
# Measured: the worst per-step loss difference from the torch reference over the 50 steps (fp32, 2 CPU cores,
# losses ~1.3-5.9), with XLA / without: causal-lm 5.3e-6 / 4.8e-6, sequence-classification 2.7e-6 / 2.7e-6,
# question-answering 6.7e-6 / 6.7e-6: float32 round-off, amplified by training (at learning rate 2e-3 instead of
# 5e-4 QA's losses drift 1e-2 apart by step 30). Before `DenseAdamW` put epsilon where torch does (Keras adds it to
# sqrt(v) before v's bias correction, 31.6x torch's at the first update) the same runs were 2.2e-5, 1.0e-5 and
# 2.0e-5 apart; with that placement moved into the reference they were 5.3e-6, 2.6e-6 and 6.7e-6 apart: the
# placement was the rest. Tolerance: 2e-5, 3x the worst measured.
LOSS_ATOL = 2e-5

WORDS = (
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "red",
    "blue",
    "big",
    "small",
    "quick",
    "slow",
    "and",
    "then",
)
LABELS = ("negative", "neutral", "positive")


def sentence(rng: np.random.Generator, length: int) -> str:
    return " ".join(rng.choice(WORDS, size=length))


def write_data(folder: Path) -> dict[str, Path]:
    """One small file per task: text, a csv with string labels, SQuAD-style jsonl."""
    rng = np.random.default_rng(0)
    text = folder / "train.txt"
    text.write_text("\n".join(sentence(rng, 12) + "." for _ in range(60)))
    csv = folder / "train.csv"
    rows = [f'"{sentence(rng, int(rng.integers(3, 9)))}",{LABELS[int(rng.integers(3))]}' for _ in range(40)]
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    squad = folder / "train.jsonl"
    with squad.open("w") as f:
        for index in range(30):
            words = list(rng.choice(WORDS, size=10))
            start = int(rng.integers(0, 8))
            answer = " ".join(words[start : start + 2])
            context = " ".join(words)
            answer_start = len(" ".join(words[:start])) + (1 if start else 0)
            row = {"id": str(index), "question": sentence(rng, 3) + "?", "context": context}
            row["answers"] = {"text": [answer], "answer_start": [answer_start]}
            f.write(json.dumps(row) + "\n")
    return {"causal-lm": text, "sequence-classification": csv, "question-answering": squad}


TASK_HEAD = {
    "causal-lm": "OPTForCausalLM",
    "sequence-classification": "OPTForSequenceClassification",
    "question-answering": "OPTForQuestionAnswering",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """{task: (options, data, folder of the HF-written initial checkpoint)}, on a BPE trained on the data."""
    import torch
    import transformers

    from opt_core.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("train_tf")
    files = write_data(folder)
    tokenizer = train_bpe_tokenizer([str(files["causal-lm"])], 300, folder / "tokenizer")
    result = {}
    for task, file in files.items():
        opts = TrainOptions(
            [file],
            folder / f"out_{task}",
            task=task,
            steps=PARITY_STEPS,
            batch_size=4,
            learning_rate=5e-4,
            warmup_steps=5,
            schedule="linear",
            weight_decay=0.1,
            clip_norm=1.0,
            seq_len=16,
            max_length=32,
            stride=8,
            eval_fraction=0.1,
            eval_every=PARITY_STEPS,
            save_every=PARITY_STEPS,
            log_every=1,
            dropout=False,
        )
        data = load_data(opts, tokenizer)
        torch.manual_seed(0)
        config = transformers.OPTConfig(**{**BASE, "vocab_size": len(tokenizer)}, **data.config_updates)
        model = getattr(transformers, TASK_HEAD[task])._from_config(config, attn_implementation="eager")
        randomize_(model, 0)
        model.save_pretrained(folder / f"init_{task}")
        result[task] = (opts, data, folder / f"init_{task}")
    return result


def hf_reference_losses(init: Path, task: str, opts: TrainOptions, data) -> list[float]:
    """HF Trainer's optimisation by hand: AdamW over its two parameter groups, the warmup + linear schedule,
    `clip_grad_norm_`, dropout off."""
    import torch
    import transformers
    from transformers import Trainer, get_linear_schedule_with_warmup

    model = getattr(transformers, TASK_HEAD[task]).from_pretrained(init, attn_implementation="eager").train()
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decayed], "weight_decay": opts.weight_decay},
        {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
    ]
    betas = (opts.adam_beta1, opts.adam_beta2)
    optimizer = torch.optim.AdamW(groups, lr=opts.learning_rate, betas=betas, eps=opts.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, opts.warmup_steps, opts.steps)
    losses, rows = [], len(data.train["input_ids"])
    for step in range(opts.steps):
        picked = batch_indices(rows, opts.batch_size, step, opts.seed, opts.shuffle)
        keys = ("input_ids", "attention_mask", "labels", "start_positions", "end_positions")
        batch = {k: torch.as_tensor(v[picked]).long() for k, v in data.train.items() if k in keys}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train_losses(folder: Path) -> list[float]:
    return [r["loss"] for r in log_of(folder) if r["event"] == "train"]


def log_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tasks):
    """trained(task, jit_compile) -> (options, data, trainer, init folder) after the 50 steps of `opt_tf.train`."""
    from opt_tf.train import MODEL_OF_HEAD, TFTrainer

    cache = {}

    def get(task: str, jit_compile: bool = False):
        if (task, jit_compile) not in cache:
            opts, data, init = tasks[task]
            opts = dataclasses.replace(opts, output=opts.output.with_name(f"{opts.output.name}_{jit_compile}"))
            model = MODEL_OF_HEAD[opts.head].from_pretrained(init)
            trainer = TFTrainer(model, opts, jit_compile=jit_compile)
            run_training(opts, data, trainer, {})
            cache[task, jit_compile] = (opts, data, trainer, init)
        return cache[task, jit_compile]

    return get


def worst_difference(trained, task: str, jit_compile: bool) -> float:
    opts, data, _, init = trained(task, jit_compile)
    losses = train_losses(opts.output)
    assert len(losses) == PARITY_STEPS
    assert losses[-1] < losses[0]  # it learns
    expected = hf_reference_losses(init, task, opts, data)
    worst = float(np.abs(np.asarray(losses) - np.asarray(expected)).max())
    print(f"{task} (XLA {jit_compile}): worst per-step loss difference {worst:.3g}")
    return worst


# Without XLA here, for the test's time (compiling costs ~6 s a model); the slow test runs the default, XLA.
@pytest.mark.parametrize("task", list(TASK_HEAD))
def test_losses_equal_hf_torch_adamw_for_50_steps(trained, task):
    worst = worst_difference(trained, task, jit_compile=False)
    assert worst <= LOSS_ATOL, f"{task}: worst per-step loss difference {worst:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_HEAD))
def test_losses_equal_hf_torch_adamw_with_xla(trained, task):
    worst = worst_difference(trained, task, jit_compile=True)
    assert worst <= LOSS_ATOL, f"{task}: worst per-step loss difference {worst:.3g}"


@pytest.mark.parametrize("task", list(TASK_HEAD))
def test_the_final_folder_loads_in_hf_with_the_same_logits(trained, task):
    import torch
    import transformers

    opts, data, trainer, _ = trained(task)
    state = json.loads((opts.output / STATE_NAME).read_text())
    assert state["step"] == PARITY_STEPS
    hf_model = getattr(transformers, TASK_HEAD[task]).from_pretrained(opts.output, attn_implementation="eager")
    ids, mask = data.eval["input_ids"][:3], data.eval["attention_mask"][:3]
    with torch.no_grad():
        hf_out = hf_model(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long())
    out = trainer.model(ids, attention_mask=mask)
    names = ("start_logits", "end_logits") if task == "question-answering" else ("logits",)
    for name in names:
        np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(hf_out, name).numpy(), atol=FP32_ATOL)
    assert {"eval_loss"} <= set(log_of(opts.output)[-1]) or task == "question-answering"


def test_weight_decay_skips_what_decays_excludes(trained):
    from opt_tf.train import canonical_variables

    _, _, trainer, _ = trained("question-answering")
    variables = canonical_variables(trainer.model)
    assert {name: trainer.optimizer._use_weight_decay(v) for name, v in variables.items()} == {
        name: decays(name) for name in variables
    }
    assert len(variables) == len(trainer.model.trainable_variables)


def test_the_pad_row_only_decays_as_in_hf(trained):
    """QA rows are padded to max_length and the pad positions' logits enter the loss's softmax, but HF's padding_idx
    gives the pad row no gradient from its lookups (nor does the model's lookup, `opt_tf.modeling`): AdamW's moments
    stay 0, so the row only decays, by 1 - rate * decay a step."""
    from opt_core.safetensors_file import read_safetensors
    from opt_core.training import learning_rate

    opts, data, trainer, init = trained("question-answering")
    pad = trainer.model.config.pad_token_id
    assert (data.train["input_ids"] == pad).any()
    start = read_safetensors(init / "model.safetensors")["model.decoder.embed_tokens.weight"][pad]
    decay = np.prod([1 - np.float32(learning_rate(step, opts) * opts.weight_decay) for step in range(opts.steps)])
    trained_row = trainer.model.get_input_embeddings().embeddings.numpy()[pad]
    np.testing.assert_allclose(trained_row, start * decay, rtol=1e-5)  # float32 products of 50 factors: ~1e-6
    assert decay < 0.9999  # the 50 steps decayed it


# ----- resuming, accumulation: a causal LM on arrays (the session's HF checkpoint, dropout on)

STEPS, SAVE_AT, KILL_AT = 8, 4, 6


class Killed(Exception):
    pass


def lm_rows() -> TextRows:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BASE["vocab_size"], size=(40, 12)).astype(np.int32)
    ids[:, 0] = 2
    rows = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    return TextRows("causal-lm", rows, {k: v[:5] for k, v in rows.items()}, {})


def tf_trainer(init: Path, opts: TrainOptions, kill_at: int | None = None, dropout: float = 0.1):
    from opt_tf import TFOPTForCausalLM
    from opt_tf.train import TFTrainer

    class Trainer(TFTrainer):
        def train_step(self, batch, rate, step):
            if step == kill_at:
                raise Killed
            return super().train_step(batch, rate, step)

    # dropout on: its masks must follow the step too; no XLA, to keep the test short (the parity runs use it)
    return Trainer(TFOPTForCausalLM.from_pretrained(init, dropout=dropout), opts, jit_compile=False)


def run_options(folder: Path, **changes) -> TrainOptions:
    fields = dict(steps=STEPS, batch_size=2, grad_accum=2, warmup_steps=2, learning_rate=1e-2, save_every=SAVE_AT)
    fields.update(eval_every=SAVE_AT, log_every=1, save_dtype="bfloat16")  # bf16 on disk: float32 kept aside
    return TrainOptions([], folder, **{**fields, **changes})


def test_a_resumed_run_gives_the_losses_of_an_uninterrupted_one(hf_checkpoint, tmp_path):
    init, _ = hf_checkpoint("pre_ln")
    whole = run_options(tmp_path / "whole")
    reference = tf_trainer(init, whole)
    run_training(whole, lm_rows(), reference, {"extra.txt": b"tokenizer files"})

    opts = run_options(tmp_path / "killed")
    with pytest.raises(Killed):
        run_training(opts, lm_rows(), tf_trainer(init, opts, kill_at=KILL_AT), {})
    assert json.loads((opts.output / STATE_NAME).read_text())["step"] == SAVE_AT
    resumed_options = dataclasses.replace(opts, resume=True)
    resumed = tf_trainer(init, resumed_options)  # its weights and optimizer state all come from the checkpoint
    run_training(resumed_options, lm_rows(), resumed, {})

    def without_speed(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert without_speed(log_of(opts.output)) == without_speed(log_of(whole.output))
    assert int(resumed.optimizer.iterations.numpy()) == STEPS
    for a, b in zip(resumed.model.weights, reference.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_accumulating_micro_batches_is_one_big_batch(hf_checkpoint, tmp_path):
    init, _ = hf_checkpoint("pre_ln")
    losses = {}
    for accumulation in (1, 2):
        opts = run_options(tmp_path / str(accumulation), steps=3, batch_size=4 // accumulation, grad_accum=accumulation)
        opts = dataclasses.replace(opts, save_every=100, eval_every=100, shuffle=False)
        run_training(opts, lm_rows(), tf_trainer(init, opts, dropout=0.0), {})
        losses[accumulation] = train_losses(opts.output)
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


# ----- errors, and the entry point


def test_micro_batches_with_unequal_loss_counts_are_refused(trained):
    from opt_core.errors import ConfigError

    opts, data, trainer, _ = trained("causal-lm")
    batch = {k: np.stack([v[:2], v[2:4]]) for k, v in data.train.items()}  # A=2 micro-batches of 2 rows
    batch["labels"] = batch["labels"].copy()
    batch["labels"][1, :, -3:] = -100
    with pytest.raises(ConfigError, match=r"step 7: its micro-batches have \[30, 24\] loss terms"):
        trainer.train_step(batch, 1e-3, 7)


def test_optimizer_state_of_another_model_is_refused(trained):
    from opt_core.errors import ConfigError

    _, _, causal, _ = trained("causal-lm")
    opts, _, classifier, _ = trained("sequence-classification")
    with pytest.raises(ConfigError, match=r"optimizer.safetensors does not match .* missing \['score.weight"):
        classifier.restore(opts.output, causal.optimizer_state())


def test_train_from_files_in_bf16_then_resume(tmp_path, monkeypatch):
    import opt_tf.train
    from opt_core.config import OPTConfig
    from opt_tf import TFOPTForSequenceClassification
    from opt_tf.train import train

    monkeypatch.setattr(opt_tf.train, "JIT_COMPILE", False)  # XLA's compile would double the test's time
    files = write_data(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(OPTConfig(**BASE).to_json_string())
    flags = dict(train_files=[files["sequence-classification"]], output=tmp_path / "out", config=str(config))
    flags.update(task="sequence-classification", vocab_size=300, max_length=32, steps=3, batch_size=4)
    flags.update(warmup_steps=1, learning_rate=1e-3, eval_fraction=0.2, log_every=1, dtype="bfloat16")
    flags.update(save_dtype="bfloat16", save_every=2)
    first = train(**flags)
    assert first["step"] == 3 and 0 <= first["accuracy"] <= 1 and math.isfinite(first["eval_loss"])
    out = tmp_path / "out"
    assert {"tokenizer.json", "optimizer.safetensors", STATE_NAME, "config.json"} <= {p.name for p in out.iterdir()}
    model = TFOPTForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(LABELS))
    resumed = train(**{**flags, "steps": 5, "resume": True})
    assert resumed["step"] == 5
    assert [r["step"] for r in log_of(out) if r["event"] == "train"] == [1, 2, 3, 4, 5]
