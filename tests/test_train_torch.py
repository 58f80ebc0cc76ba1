"""Training in PyTorch (`opt_torch.train`, issue 16): per-step losses equal a reference loop written here with HF
transformers' PyTorch OPT and `torch.optim.AdamW` (HF Trainer's param groups and schedules) for each task over 50
steps in fp32; a run killed after a checkpoint and resumed equals an uninterrupted one bit for bit; accumulation
equals one big batch; bf16 autocast stays near fp32; the eval metric improves on an easy task; the final folder
loads in HF transformers with the trained model's logits.

The data are files written here (text, a csv with string labels, SQuAD-style jsonl) read by `opt_core.data` with a
small BPE tokenizer trained on them; the checkpoints are HF-written tiny models of that vocabulary.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import BASE, FP32_ATOL, assert_close_on_real_tokens, randomize_

from opt_core.config import OPTConfig
from opt_core.data import batch_indices
from opt_core.data import evaluate as task_metrics
from opt_core.safetensors_file import read_safetensors
from opt_core.tokenizer import OPTTokenizer, train_bpe_tokenizer
from opt_core.training import LOG_NAME, STATE_NAME, TrainOptions, evaluate, load_data, run_training
from opt_torch.train import (
    MODEL_OF_HEAD,
    OPTIMIZER_NAME,
    TorchTrainer,
    build_model,
    build_optimizer,
    load_model,
    train,
)

HF_CLASSES = {
    "causal-lm": "OPTForCausalLM",
    "sequence-classification": "OPTForSequenceClassification",
    "question-answering": "OPTForQuestionAnswering",
}
TARGETS = {
    "causal-lm": ("labels",),
    "sequence-classification": ("labels",),
    "question-answering": ("start_positions", "end_positions"),
}
OUTPUTS = {
    "causal-lm": ("logits",),
    "sequence-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
}
PARITY_STEPS = 50
# Worst per-step |loss - HF reference loss| over the 50 fp32 steps, measured on CPU with one thread (torch 2.13,
# transformers 5.23), seeds 0-3: causal-lm 1.24e-6, sequence-classification 2.4e-7, question-answering 2.4e-7 (1-3
# float32 ulps of losses ~1-5: ours sums each row's terms and divides by the count, HF takes one fused mean). The
# tolerance is 8x the worst.
LOSS_ATOL = 1e-5

WORDS = "the a cat dog bird sat ran on under over mat tree house red blue green small big old new".split()  # noqa: SIM905
NAMES, CITIES = ["anna", "ben", "carl", "dora", "emil", "fay"], ["paris", "rome", "oslo", "lima", "kyiv", "bern"]
CUES = {"negative": "bad", "neutral": "okay", "positive": "good"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these steps are tiny, and two threads on two busy cores run them ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- data and checkpoints


def sentence(rng: np.random.Generator, length: int = 6) -> str:
    return " ".join(rng.choice(WORDS, size=length))


def classification_rows(rng: np.random.Generator, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        label = str(rng.choice(list(CUES)))
        words = sentence(rng, 5).split()
        words.insert(int(rng.integers(0, 5)), CUES[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def squad_rows(rng: np.random.Generator, count: int) -> list[dict]:
    rows = []
    for index in range(count):
        name, other = rng.choice(NAMES, size=2, replace=False)
        city, place = rng.choice(CITIES, size=2, replace=False)
        context = f"{sentence(rng, 3)} . {other} lives in {place} . {name} lives in {city} . {sentence(rng, 3)} ."
        start = context.index(f"{name} lives in {city}") + len(f"{name} lives in ")
        answers = {"text": [str(city)], "answer_start": [start]}
        rows.append(
            {"id": f"q{index}", "question": f"where does {name} live ?", "context": context, "answers": answers}
        )
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """{task: data file, "tokenizer": folder}: the three tasks' files and a BPE tokenizer trained on their text."""
    folder = tmp_path_factory.mktemp("train_torch_data")
    rng = np.random.default_rng(0)
    text = folder / "text.txt"
    text.write_text("\n".join(sentence(rng, int(rng.integers(4, 12))) for _ in range(120)) + "\n")
    labelled = folder / "labels.csv"
    with labelled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(classification_rows(rng, 80))
    squad = folder / "squad.jsonl"
    squad.write_text("".join(json.dumps(row) + "\n" for row in squad_rows(rng, 48)))
    corpus = folder / "corpus.txt"
    corpus.write_text(text.read_text() + " ".join(CUES.values()) + "\n" + squad.read_text())
    tokenizer = folder / "tokenizer"
    train_bpe_tokenizer([corpus], 320, tokenizer)
    return {"causal-lm": text, "sequence-classification": labelled, "question-answering": squad, "tokenizer": tokenizer}


def hf_checkpoints(tmp_path_factory, tokenizer_folder: Path, classes: dict[str, str]) -> dict[str, Path]:
    """{task: folder}: HF transformers' tiny OPT of the tokenizer's vocabulary, with the task's head (`classes`:
    {task: HF class name}), random weights everywhere (HF's init leaves biases 0 and norms 1), saved by HF."""
    import transformers

    vocab = len(OPTTokenizer.from_pretrained(tokenizer_folder))
    folders = {}
    for task, name in classes.items():
        torch.manual_seed(0)
        config = transformers.OPTConfig(**{**BASE, "vocab_size": vocab}, num_labels=len(CUES))
        model = getattr(transformers, name)._from_config(config)
        randomize_(model, seed=1)
        if task == "causal-lm":
            model.tie_weights()
        folders[task] = Path(tmp_path_factory.mktemp(f"hf_{name}"))
        model.save_pretrained(folders[task])
    return folders


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, files) -> dict:
    return hf_checkpoints(tmp_path_factory, files["tokenizer"], HF_CLASSES)


def task_options(files: dict, task: str, output: Path, init_from, **changes) -> TrainOptions:
    fields = dict(
        task=task,
        init_from=str(init_from),
        tokenizer=str(files["tokenizer"]),
        steps=PARITY_STEPS,
        batch_size=4,
        learning_rate=2e-3,
        warmup_steps=5,
        schedule="cosine" if task == "sequence-classification" else "linear",
        weight_decay=0.1,
        clip_norm=1.0,
        seq_len=16,
        max_length=BASE["max_position_embeddings"],
        stride=8,
        eval_fraction=0.15,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        dropout=False,
    )
    return TrainOptions([files[task]], output, **{**fields, **changes})


def log_of(folder: Path, event: str = "train") -> list[dict]:
    records = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]
    return [record for record in records if record["event"] == event]


def setup(options: TrainOptions):
    """What `opt_torch.train.train` builds, kept in hand: (tokenizer, data, trainer)."""
    tokenizer = OPTTokenizer.from_pretrained(options.tokenizer)
    data = load_data(options, tokenizer)
    model = build_model(options, tokenizer, data.config_updates)
    return tokenizer, data, TorchTrainer(model, options, device="cpu")


# ----- parity with HF transformers


def hf_reference_losses(options: TrainOptions, data, folder: Path) -> tuple[list[float], torch.nn.Module]:
    """HF's OPT of the task, trained as HF's Trainer would: AdamW over Trainer's two param groups, HF's schedule,
    clipping the global norm, the same batches; returns the per-step losses and the trained model."""
    import transformers
    from transformers import Trainer, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    model = getattr(transformers, HF_CLASSES[options.task]).from_pretrained(folder).train(False)
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decayed], "weight_decay": options.weight_decay},
        {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
    ]
    betas = (options.adam_beta1, options.adam_beta2)
    # HF Trainer's default optimizer since torch 2.8 is "adamw_torch_fused", as ours. (The for-loop kernel rounds
    # differently; Adam scales that up on parameters whose gradients are near zero, e.g. the final norm's bias moves
    # 1.8e-3 apart over 50 steps while the losses stay within 1e-6.)
    optimizer = torch.optim.AdamW(groups, lr=options.learning_rate, betas=betas, eps=options.adam_epsilon, fused=True)
    make = get_linear_schedule_with_warmup if options.schedule == "linear" else get_cosine_schedule_with_warmup
    scheduler = make(optimizer, options.warmup_steps, options.steps)
    keys = ("input_ids", "attention_mask", *TARGETS[options.task])
    losses = []
    for step in range(options.steps):
        rows = batch_indices(data.num_train_rows, options.batch_size, step, options.seed, options.shuffle)
        loss = model(**{k: torch.from_numpy(data.train[k][rows]).long() for k in keys}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


@pytest.fixture(scope="module")
def parity(tmp_path_factory, files, checkpoints) -> dict:
    """{task: (options, data, trainer, our losses, HF's losses, HF's trained model)}, trained once per module."""
    runs = {}
    for task in HF_CLASSES:
        options = task_options(files, task, tmp_path_factory.mktemp(f"torch_{task}"), checkpoints[task])
        tokenizer, data, trainer = setup(options)
        run_training(options, data, trainer, {})
        ours = [record["loss"] for record in log_of(options.output)]
        reference, hf_model = hf_reference_losses(options, data, checkpoints[task])
        runs[task] = (options, data, trainer, ours, reference, hf_model)
    return runs


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_per_step_losses_equal_an_hf_reference_loop(parity, task):
    options, data, trainer, ours, reference, hf_model = parity[task]
    assert len(ours) == len(reference) == PARITY_STEPS
    worst = float(np.max(np.abs(np.asarray(ours) - np.asarray(reference))))
    print(f"{task}: worst per-step loss difference vs HF over {PARITY_STEPS} steps: {worst:.3g}")
    assert worst <= LOSS_ATOL, f"{task}: worst per-step loss difference {worst:.3g} exceeds {LOSS_ATOL}"
    assert ours[-1] < ours[0]  # it learns
    # The trained weights too: every parameter near HF's after 50 updates. Not k_proj's bias: it adds q . b_k to
    # every key's score alike, which softmax cancels, so its gradient is rounding noise that Adam scales up to lr.
    hf_params = dict(hf_model.named_parameters())
    for name, param in trainer.params.items():
        if name.endswith("k_proj.bias"):
            continue
        np.testing.assert_allclose(param.detach().numpy(), hf_params[name].detach().numpy(), atol=1e-4, err_msg=name)


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_the_final_folder_loads_in_hf_with_the_trained_logits(parity, task):
    import transformers

    options, data, trainer, *_ = parity[task]
    assert json.loads((options.output / STATE_NAME).read_text())["step"] == PARITY_STEPS
    hf_model = getattr(transformers, HF_CLASSES[task]).from_pretrained(options.output).eval()
    ids, mask = (torch.from_numpy(data.eval[k][:4]).long() for k in ("input_ids", "attention_mask"))
    trainer.model.eval()
    with torch.no_grad():
        ours, theirs = trainer.model(ids, mask), hf_model(ids, mask)
    for name in OUTPUTS[task]:
        real = mask if name != "logits" or task == "causal-lm" else torch.ones(len(ids))  # pooled: one per row
        assert_close_on_real_tokens(getattr(ours, name), getattr(theirs, name), real, FP32_ATOL, name)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head", list(MODEL_OF_HEAD))
def test_the_param_groups_are_hf_trainer_s(tmp_path, head, tied):
    import transformers
    from transformers import Trainer

    config = OPTConfig(**{**BASE, "tie_word_embeddings": tied})
    model = MODEL_OF_HEAD[head](config)
    hf_model = getattr(transformers, type(model).__name__)(transformers.OPTConfig(**config.to_dict()))
    hf_model.tie_weights()  # transformers 5 ties in from_pretrained, not in the constructor
    # Trainer.create_optimizer's groups: named_parameters (a tied head once) filtered by the decay names.
    hf_decayed = set(Trainer.get_decay_parameter_names(None, hf_model)) & {n for n, _ in hf_model.named_parameters()}
    names = {id(param): name for name, param in model.named_parameters()}
    decayed, kept = build_optimizer(model, TrainOptions([], tmp_path, weight_decay=0.1)).param_groups
    assert {names[id(p)] for p in decayed["params"]} == hf_decayed and decayed["weight_decay"] == 0.1
    assert {names[id(p)] for p in kept["params"]} == set(names.values()) - hf_decayed and kept["weight_decay"] == 0
    assert len(decayed["params"]) + len(kept["params"]) == len(list(hf_model.parameters()))  # a tied head once


# ----- resuming, accumulation, bf16, torch.compile


STEPS, SAVE_AT, KILL_AT = 8, 4, 6  # killed in its 7th step, after the checkpoint of step 4 and two more logged


class Killed(Exception):
    pass


def killable(options: TrainOptions, folder: Path, kill_at: int | None = None) -> TorchTrainer:
    class Trainer(TorchTrainer):
        def train_step(self, batch, rate, step):
            if step == kill_at:
                raise Killed
            return super().train_step(batch, rate, step)

    model = load_model(__import__("opt_torch").OPTForCausalLM, folder, options.seed, dropout=0.1)
    return Trainer(model, options, device="cpu")  # dropout on: its draws must follow the step too


def test_a_resumed_run_gives_the_losses_and_weights_of_an_uninterrupted_one(tmp_path, files, checkpoints):
    changes = dict(steps=STEPS, grad_accum=2, batch_size=2, save_every=SAVE_AT, eval_every=SAVE_AT, dropout=True)
    changes["save_dtype"] = "bfloat16"  # bf16 on disk: the float32 weights are kept beside the optimizer state
    first = task_options(files, "causal-lm", tmp_path / "whole", checkpoints["causal-lm"], **changes)
    _, data, _ = setup(first)
    whole = killable(first, checkpoints["causal-lm"])
    run_training(first, data, whole, {})

    second = dataclasses.replace(first, output=tmp_path / "killed")
    with pytest.raises(Killed):
        run_training(second, data, killable(second, checkpoints["causal-lm"], kill_at=KILL_AT), {})
    assert json.loads((second.output / STATE_NAME).read_text())["step"] == SAVE_AT
    assert log_of(second.output)[-1]["step"] == KILL_AT  # past the checkpoint: cut back on resume
    optimizer = read_safetensors(second.output / OPTIMIZER_NAME)  # no pickle: the library's own reader loads it
    assert "exp_avg/model.decoder.embed_tokens.weight" in optimizer and "master/lm_head.weight" not in optimizer

    resumed_options = dataclasses.replace(second, resume=True)
    resumed = killable(resumed_options, second.output)  # everything comes from the checkpoint
    run_training(resumed_options, data, resumed, {})

    def without_speed(folder):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log_of(folder) + log_of(folder, "eval")]

    assert without_speed(second.output) == without_speed(first.output)
    for name, param in whole.params.items():
        assert torch.equal(resumed.params[name], param), name


def test_a_bad_optimizer_file_is_a_checkpoint_error(tmp_path, files, checkpoints):
    from opt_core.errors import CheckpointError
    from opt_torch.train import restore_optimizer

    options = task_options(files, "causal-lm", tmp_path, checkpoints["causal-lm"], steps=1)
    trainer = setup(options)[2]
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        restore_optimizer(trainer.optimizer, trainer.params, b"not safetensors", "float32")
    partial = safetensors.torch.save({"exp_avg/model.decoder.embed_tokens.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="the state of model.decoder.embed_tokens.weight lacks"):
        restore_optimizer(trainer.optimizer, trainer.params, partial, "float32")


def test_accumulating_micro_batches_is_one_big_batch(tmp_path, files, checkpoints):
    losses = {}
    for accumulation in (1, 2):
        options = task_options(
            files, "question-answering", tmp_path / str(accumulation), checkpoints["question-answering"], steps=4
        )
        options = dataclasses.replace(options, batch_size=4 // accumulation, grad_accum=accumulation)
        _, data, trainer = setup(options)
        run_training(options, data, trainer, {})
        losses[accumulation] = [record["loss"] for record in log_of(options.output)]
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


def test_bf16_mixed_precision_stays_near_fp32(tmp_path, files, checkpoints):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        options = task_options(files, "causal-lm", tmp_path / dtype, checkpoints["causal-lm"], steps=6, dtype=dtype)
        _, data, trainer = setup(options)
        run_training(options, data, trainer, {})
        losses[dtype] = [record["loss"] for record in log_of(options.output)]
        assert all(p.dtype == torch.float32 for p in trainer.params.values())  # master weights stay float32
    assert losses["bfloat16"] != losses["float32"]  # autocast did compute in bf16
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.05)


@pytest.mark.slow  # inductor compiles the forward and backward on CPU: tens of seconds
def test_compiled_steps_give_the_eager_losses(tmp_path, files, checkpoints):
    losses = {}
    for compiled in (False, True):
        options = task_options(files, "causal-lm", tmp_path / str(compiled), checkpoints["causal-lm"], steps=4)
        tokenizer = OPTTokenizer.from_pretrained(options.tokenizer)
        data = load_data(options, tokenizer)
        model = build_model(options, tokenizer, data.config_updates)
        run_training(options, data, TorchTrainer(model, options, device="cpu", compile=compiled), {})
        losses[compiled] = [record["loss"] for record in log_of(options.output)]
    np.testing.assert_allclose(losses[True], losses[False], atol=1e-5)


# ----- the entry point: a fresh head learns an easy task


@pytest.mark.filterwarnings("ignore:.*newly initialised")
def test_train_fine_tunes_a_fresh_head_and_the_metric_improves(tmp_path, files, checkpoints):
    task = "sequence-classification"  # the label is its cue word; the causal-LM checkpoint has no head for it
    options = task_options(files, task, tmp_path / "out", checkpoints["causal-lm"], steps=60, learning_rate=5e-3)
    _, data, trainer = setup(options)
    head = trainer.model.score.weight.detach().clone()
    assert torch.equal(setup(options)[2].model.score.weight, head)  # the fresh head is drawn from options.seed
    before = evaluate(options, data, trainer, task_metrics)

    result = train(options, device="cpu")

    assert result["step"] == options.steps
    assert result["eval_loss"] < before["eval_loss"]
    assert result["accuracy"] > before["accuracy"] and result["accuracy"] >= 0.9, (before, result)
    config = json.loads((options.output / "config.json").read_text())
    assert config["architectures"] == ["OPTForSequenceClassification"]
    assert sorted(config["id2label"].values()) == sorted(CUES)
    assert (options.output / "tokenizer.json").is_file()


def test_a_mesh_is_refused_by_name_before_any_work(tmp_path):
    """`mesh` is the Flax and Keras trainers' option; the torch trainer refuses it instead of ignoring it."""
    from opt_core.errors import ConfigError
    from opt_torch.train import train

    with pytest.raises(ConfigError, match=r"mesh='data=2'.*torchrun"):
        train(train_files=[str(tmp_path / "none.txt")], output=str(tmp_path / "out"), mesh="data=2")
    assert not (tmp_path / "out").exists()
