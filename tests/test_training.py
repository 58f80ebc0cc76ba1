"""Training (issue 16), the framework-free half (`opt_core.training`) and the Flax step (`opt_flax.train`):
HF's schedules, HF Trainer's weight-decay rule, option errors, the log's schedule, and a run killed after a
checkpoint and resumed giving the same losses and weights as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE

from opt_core.config import OPTConfig
from opt_core.errors import ConfigError
from opt_core.pretrained import load_pretrained
from opt_core.training import (
    HEAD_OF_TASK,
    LOG_NAME,
    STATE_NAME,
    TextRows,
    TrainOptions,
    decays,
    learning_rate,
    run_training,
)
from opt_core.weights import HEADS, parameter_specs


def options(tmp_path: Path, **changes) -> TrainOptions:
    return TrainOptions([tmp_path / "train.txt"], tmp_path / "out", **changes)


# ----- the schedule and the decay rule, against HF


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("warmup", "steps"), [(0, 10), (3, 10), (10, 10), (5, 37)])
def test_the_schedule_is_hf_s(tmp_path, schedule, warmup, steps):
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_linear_schedule_with_warmup if schedule == "linear" else get_cosine_schedule_with_warmup
    opts = options(tmp_path, learning_rate=3e-4, warmup_steps=warmup, steps=steps, schedule=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=opts.learning_rate)
    scheduler = make(optimizer, warmup, steps)
    for step in range(steps + 2):  # an update's rate is the one set before it; past the end it stays 0
        assert learning_rate(step, opts) == optimizer.param_groups[0]["lr"], step
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("variant", [{}, dict(enable_bias=False), dict(layer_norm_elementwise_affine=False)])
@pytest.mark.parametrize("head", [h for h in HEADS if h != "base"])
def test_decays_is_hf_trainer_s_rule_on_every_parameter(variant, head):
    import transformers
    from transformers import Trainer

    config = OPTConfig(**{**BASE, **variant, "tie_word_embeddings": False})
    hf_class = {
        "causal_lm": "OPTForCausalLM",
        "sequence_classification": "OPTForSequenceClassification",
        "question_answering": "OPTForQuestionAnswering",
    }[head]
    hf_model = getattr(transformers, hf_class)(transformers.OPTConfig(**config.to_dict()))
    hf_decayed = set(Trainer.get_decay_parameter_names(None, hf_model))
    names = [spec.name for spec in parameter_specs(config, head)]
    assert set(names) == {name for name, _ in hf_model.named_parameters()}
    assert {name for name in names if decays(name)} == hf_decayed


def test_flax_decay_mask_follows_decays():
    import jax

    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.sharding import flax_key
    from opt_flax.train import decay_mask

    config = OPTConfig(**{**BASE, "tie_word_embeddings": False})
    model = FlaxOPTForCausalLM(config)
    mask = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(model.params))
    }
    specs = parameter_specs(config, "causal_lm")
    assert mask == {flax_key(spec, "causal_lm"): decays(spec.name) for spec in specs}


# ----- options


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("grad_accum", 1.5),
        ("learning_rate", 0.0),
        ("learning_rate", math.nan),
        ("warmup_steps", -1),
        ("schedule", "constant"),
        ("weight_decay", -0.1),
        ("clip_norm", 0.0),
        ("adam_beta2", 1.0),
        ("adam_epsilon", 0),
        ("seq_len", 1),
        ("stride", 256),
        ("eval_fraction", 1.0),
        ("task", "translation"),
        ("dtype", "float16"),
        ("save_dtype", "int8"),
        ("log_every", True),
    ],
)
def test_a_bad_option_is_an_error_naming_it_and_its_value(tmp_path, option, value):
    task = {"stride": "question-answering"}.get(option, "causal-lm")  # only QA cuts rows into strided windows
    with pytest.raises(ConfigError) as error:
        options(tmp_path, **{"task": task, option: value})
    assert str(error.value).startswith(f"{option} must be ") and repr(value) in str(error.value)


def test_train_names_a_missing_data_file(tmp_path):
    from opt_flax.train import train

    with pytest.raises(ConfigError, match="train_files .*train.txt: no such file"):
        train(options(tmp_path))
    assert not (tmp_path / "out").exists()


# ----- the loop, in Flax: the log, and resuming


STEPS, SAVE_AT, KILL_AT = 8, 4, 6  # killed in its 7th step, after the checkpoint of step 4 and two more logged


class Killed(Exception):
    pass


def task_data() -> TextRows:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BASE["vocab_size"], size=(40, 12)).astype(np.int32)
    ids[:, 0] = 2
    rows = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    held = {k: v[:5] for k, v in rows.items()}
    return TextRows("causal-lm", rows, held, {})


def flax_trainer(opts: TrainOptions, kill_at: int | None = None, dropout: float = 0.1):
    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.train import FlaxTrainer

    class Trainer(FlaxTrainer):
        def train_step(self, batch, rate, step):
            if step == kill_at:
                raise Killed
            return super().train_step(batch, rate, step)

    config = OPTConfig(**{**BASE, "dropout": dropout})  # dropout on: its keys must follow the step too
    return Trainer(FlaxOPTForCausalLM(config, seed=opts.seed), opts)


def run_options(folder: Path, **changes) -> TrainOptions:
    fields = dict(steps=STEPS, batch_size=2, grad_accum=2, warmup_steps=2, learning_rate=1e-2, save_every=SAVE_AT)
    fields.update(eval_every=SAVE_AT, log_every=1, save_dtype="bfloat16")  # bf16 on disk: float32 kept aside
    return TrainOptions([], folder, **{**fields, **changes})


def log_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    opts = run_options(folder)
    trainer = flax_trainer(opts)
    result = run_training(opts, task_data(), trainer, {"extra.txt": b"tokenizer files"})
    return folder, result, trainer


def test_the_log_has_the_issue_s_schema(uninterrupted):
    folder, result, _ = uninterrupted
    records = log_of(folder)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(records) == len(train) + len(evals)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    opts = run_options(folder)
    for record in train:
        assert set(record) == {"event", "step", "loss", "learning_rate", "tokens_per_s"}
        assert record["learning_rate"] == learning_rate(record["step"] - 1, opts)
        assert record["loss"] > 0 and record["tokens_per_s"] > 0
    assert [r["step"] for r in evals] == [SAVE_AT, STEPS]
    for record in evals:
        assert {"event", "step", "eval_loss", "perplexity"} <= set(record)
        assert record["perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
    assert result == {"step": STEPS, **{k: v for k, v in evals[-1].items() if k not in ("event", "step")}}
    state = json.loads((folder / STATE_NAME).read_text())
    assert state["step"] == STEPS and state["log_offset"] == (folder / LOG_NAME).stat().st_size
    assert (folder / "extra.txt").read_bytes() == b"tokenizer files"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["OPTForCausalLM"]


def test_a_resumed_run_gives_the_losses_of_an_uninterrupted_one(uninterrupted, tmp_path):
    import jax

    folder, _, reference = uninterrupted
    opts = run_options(tmp_path)
    with pytest.raises(Killed):
        run_training(opts, task_data(), flax_trainer(opts, kill_at=KILL_AT), {})
    assert json.loads((tmp_path / STATE_NAME).read_text())["step"] == SAVE_AT
    assert [r["step"] for r in log_of(tmp_path) if r["event"] == "train"][-1] == KILL_AT  # past the checkpoint

    resumed_options = dataclasses.replace(opts, resume=True)
    resumed = flax_trainer(resumed_options)  # a fresh model: everything comes from the checkpoint
    run_training(resumed_options, task_data(), resumed, {})

    def without_speed(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert without_speed(log_of(tmp_path)) == without_speed(log_of(folder))
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_accumulating_micro_batches_is_one_big_batch(tmp_path):
    losses = {}
    for accumulation in (1, 2):
        opts = run_options(tmp_path / str(accumulation), steps=3, batch_size=4 // accumulation)
        opts = dataclasses.replace(opts, grad_accum=accumulation, save_every=100, eval_every=100, shuffle=False)
        run_training(opts, task_data(), flax_trainer(opts, dropout=0.0), {})
        losses[accumulation] = [r["loss"] for r in log_of(opts.output) if r["event"] == "train"]
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


# ----- every task's loss and metrics


def task_batch(head: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(3, BASE["vocab_size"], size=(3, 9)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if head == "causal_lm":
        batch["labels"] = np.where(rng.random(ids.shape) < 0.3, -100, ids).astype(np.int32)
    elif head == "sequence_classification":
        batch["labels"] = np.array([0, 2, 1], dtype=np.int32)
    else:
        batch["start_positions"], batch["end_positions"] = np.array([1, 4, 0]), np.array([3, 8, 0])
    return batch


@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification", "question_answering"])
def test_the_flax_loss_is_hf_s(hf_checkpoint, head, tmp_path):
    import torch

    from opt_flax.train import MODEL_OF_HEAD, FlaxTrainer

    folder, hf_model = hf_checkpoint("pre_ln", head)
    trainer = FlaxTrainer(MODEL_OF_HEAD[head].from_pretrained(folder), options(tmp_path, dropout=False))
    batch = task_batch(head)
    outputs = trainer.eval_outputs(batch)
    with torch.no_grad():
        expected = hf_model(**{k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in batch.items()}).loss
    assert outputs["loss_sum"].sum() / outputs["loss_count"].sum() == pytest.approx(float(expected), abs=1e-5)


TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, max_position_embeddings=64)


def write_task_files(folder: Path, task: str) -> Path:
    if task == "sequence-classification":
        path = folder / "train.csv"
        lines = ["text,label"] + [f"{w} is {'good' if i % 2 else 'bad'} {i},{'pos' if i % 2 else 'neg'}" for i, w in
                                  enumerate(["this", "that", "it", "the film", "a book"] * 8)]  # fmt: skip
        path.write_text("\n".join(lines) + "\n")
        return path
    path = folder / "train.jsonl"
    rows = []
    for i in range(40):
        context = f"The cat number {i} sat on the mat near the door of house {i * 7}."
        answer = f"house {i * 7}"
        rows.append(dict(id=str(i), question=f"Where did cat {i} sit?", context=context,
                         answers={"text": [answer], "answer_start": [context.index(answer)]}))  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("task", "architecture", "metrics"),
    [
        ("sequence-classification", "OPTForSequenceClassification", {"eval_loss", "accuracy", "macro_f1"}),
        ("question-answering", "OPTForQuestionAnswering", {"exact_match", "f1"}),
    ],
)
def test_a_task_trains_end_to_end_and_hf_loads_its_folder(tmp_path, task, architecture, metrics):
    import transformers

    from opt_flax.train import train

    (tmp_path / "config.json").write_text(json.dumps(TINY_MODEL))
    result = train(
        train_files=[write_task_files(tmp_path, task)],
        output=tmp_path / "out",
        task=task,
        config=str(tmp_path / "config.json"),
        vocab_size=300,
        steps=3,
        batch_size=4,
        warmup_steps=1,
        max_length=48,
        stride=16,
        eval_fraction=0.2,
        eval_every=3,
    )
    assert set(result) == {"step"} | metrics
    evals = [r for r in log_of(tmp_path / "out") if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3] and set(evals[0]) == {"event", "step"} | metrics
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    hf_model = getattr(transformers, architecture).from_pretrained(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("a")["input_ids"][0] == 2 and (tmp_path / "out" / "generation_config.json").is_file()
    if task == "sequence-classification":
        assert hf_model.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.slow  # three runs through the entry point: a BPE and a compile each (about 40 s on 2 cores)
def test_train_resumes_a_killed_mixed_precision_run_exactly(tmp_path, monkeypatch):
    """Through the entry point: bf16 compute, float16 on disk (the float32 weights ride in the optimizer state),
    the tokenizer trained once and read back from the checkpoint."""
    from opt_flax import train as flax_train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 17} and item{i % 5}." for i in range(400)))
    (tmp_path / "config.json").write_text(json.dumps(TINY_MODEL))
    flags = dict(train_files=[corpus], config=str(tmp_path / "config.json"), vocab_size=300, steps=4,
                 batch_size=2, grad_accum=2, seq_len=16, warmup_steps=1, save_every=2, eval_every=2, log_every=1,
                 dtype="bfloat16", save_dtype="float16")  # fmt: skip
    flax_train.train(output=tmp_path / "a", **flags)
    step = flax_train.FlaxTrainer.train_step

    def killed_at_3(self, batch, rate, index):
        if index == 3:
            raise Killed
        return step(self, batch, rate, index)

    monkeypatch.setattr(flax_train.FlaxTrainer, "train_step", killed_at_3)
    with pytest.raises(Killed):
        flax_train.train(output=tmp_path / "b", **flags)
    monkeypatch.setattr(flax_train.FlaxTrainer, "train_step", step)
    flax_train.train(output=tmp_path / "b", resume=True, **flags)

    def without_speed(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert without_speed(log_of(tmp_path / "b")) == without_speed(log_of(tmp_path / "a"))
    for name in ("model.safetensors", "optimizer.msgpack", "vocab.json"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert json.loads((tmp_path / "a" / "config.json").read_text())["torch_dtype"] == "float16"


def test_resuming_with_other_batches_or_without_a_checkpoint_is_an_error(uninterrupted, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    opts = run_options(folder, resume=True, batch_size=4, seed=1)
    with pytest.raises(ConfigError, match=r"batch_size=4 \(the checkpoint's: 2\), seed=1 \(the checkpoint's: 0\)"):
        run_training(opts, task_data(), flax_trainer(opts), {})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    empty = run_options(tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        run_training(empty, task_data(), flax_trainer(empty), {})


# ----- parity: the same checkpoint, batches and formula give the same steps in Flax and PyTorch


def parity_data(head: str) -> TextRows:
    rng = np.random.default_rng(2)
    ids = rng.integers(3, BASE["vocab_size"], size=(16, 10)).astype(np.int32)
    rows = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if head == "causal_lm":
        rows["labels"] = ids.copy()
    elif head == "sequence_classification":
        rows["labels"] = rng.integers(0, 3, size=16).astype(np.int32)
    else:
        starts = rng.integers(0, 8, size=16).astype(np.int32)
        rows["start_positions"], rows["end_positions"] = starts, starts + rng.integers(0, 2, size=16).astype(np.int32)
    task = {v: k for k, v in HEAD_OF_TASK.items()}[head]
    return TextRows(task, rows, None, {})


# Parameters whose exact gradient is 0, so that what the frameworks compute is rounding noise (~1e-9), which
# Adam scales up to steps of ~lr, differently in each: a softmax over keys ignores q . b_k (the same for every
# key), and QA's softmax over positions ignores what the final norm's bias and qa_outputs' bias add to each.
NOISE_GRADIENTS = {
    "causal_lm": ("k_proj.bias",),
    "sequence_classification": ("k_proj.bias",),
    "question_answering": ("k_proj.bias", "decoder.final_layer_norm.bias", "qa_outputs.bias"),
}


@pytest.mark.parametrize(
    "head",
    [
        "causal_lm",
        pytest.param("sequence_classification", marks=pytest.mark.slow),  # ~20 s each on 2 cores
        pytest.param("question_answering", marks=pytest.mark.slow),
    ],
)
def test_flax_and_torch_take_the_same_steps(hf_checkpoint, head, tmp_path):
    """DESIGN.md's training parity: the per-step losses and the trained weights agree (float32, no dropout)."""
    import torch  # noqa: F401 - imported before opt_torch.train, as every torch test does

    from opt_flax.train import MODEL_OF_HEAD, FlaxTrainer
    from opt_torch import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
    from opt_torch.train import TorchTrainer, load_model

    folder, _ = hf_checkpoint("pre_ln", head)
    torch_class = {"causal_lm": OPTForCausalLM, "sequence_classification": OPTForSequenceClassification}
    torch_class["question_answering"] = OPTForQuestionAnswering
    data = parity_data(head)
    losses, weights = {}, {}
    for name in ("flax", "torch"):
        opts = TrainOptions([], tmp_path / name, task=data.task, steps=5, batch_size=2, grad_accum=2,
                            warmup_steps=2, learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5, dropout=False,
                            log_every=1)  # fmt: skip
        if name == "flax":
            trainer = FlaxTrainer(MODEL_OF_HEAD[head].from_pretrained(folder), opts)
        else:
            trainer = TorchTrainer(load_model(torch_class[head], folder, seed=0), opts, device="cpu")
        run_training(opts, data, trainer, {})
        losses[name] = [r["loss"] for r in log_of(opts.output)]
        weights[name] = load_pretrained(opts.output, head).tensors
    np.testing.assert_allclose(losses["flax"], losses["torch"], rtol=1e-5)
    assert weights["flax"].keys() == weights["torch"].keys()
    for key in weights["flax"]:
        if key.endswith(NOISE_GRADIENTS[head]):
            continue
        np.testing.assert_allclose(weights["flax"][key], weights["torch"][key], atol=1e-5, err_msg=key)
