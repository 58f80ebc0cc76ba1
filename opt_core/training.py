"""The framework-free half of training and fine-tuning (`opt-lm train`): options, schedule, weight-decay rule,
log, checkpoints and the loop. Each framework writes only its step.

Siblings: `opt_flax/train.py` (optax), and in turn `opt_torch/train.py` (torch.optim.AdamW) and `opt_tf/train.py`
(Keras AdamW); each implements `Trainer` below and calls `run_training`.

The loop (`run_training`): one step is one optimizer update over `grad_accum` micro-batches of `batch_size` rows,
whose rows `batch_indices` picks as a pure function of the step (so resuming is exact). The driver hands the
framework the whole step at once, stacked as [A, B, ...] (A = grad_accum): the framework accumulates the summed
loss and gradients over the micro-batches and divides by the total count of loss terms (tokens for a causal LM,
rows for the other tasks), so that accumulating A micro-batches of B rows is the same update as one batch of A x B
rows. The learning rate of each step comes from `learning_rate` (HF's schedules exactly), clipping applies to the
accumulated gradient, and weight decay skips biases and LayerNorm weights (`decays`, HF Trainer's rule).

A checkpoint is the output folder as `save_pretrained` writes it (config with the task's head, weights,
generation_config.json), the tokenizer's files, the framework's optimizer state (its own bytes) and
`training_state.json` (step, options, the log's length), committed in ONE `opt_core.files.FolderCommit` through
`save_pretrained(..., extra_files=...)`: a crash never leaves the weights of one step beside the optimizer state of
another. The last checkpoint is the final model, which every framework and HF transformers load.

Resuming reads the state, restores the framework's weights and optimizer state, cuts `training_log.jsonl` back to
its length at that checkpoint (records written after it, before a crash, would be written again) and continues from
its step: the batches and dropout keys are functions of the step, so the losses are those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from opt_core.adapters import DEFAULT_TARGET_MODULES, LoraConfig
from opt_core.config import OPTConfig
from opt_core.data import TASKS, TaskData, batch_indices, load_task_data
from opt_core.data import evaluate as task_evaluate
from opt_core.errors import ConfigError
from opt_core.files import complete_interrupted_save
from opt_core.heads import ARCHITECTURE_OF_HEAD  # noqa: F401  (the trainers import it from here)
from opt_core.tokenizer import OPTTokenizer, train_bpe_tokenizer

HEAD_OF_TASK = {
    "causal-lm": "causal_lm",
    "sequence-classification": "sequence_classification",
    "question-answering": "question_answering",
}
# What each head's evaluation needs from the model besides its loss (`Trainer.eval_outputs`, `opt_core.data.evaluate`).
EVAL_OUTPUTS = {
    "causal_lm": (),
    "sequence_classification": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
}
SCHEDULES = ("linear", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")  # bfloat16: mixed precision, float32 master weights and optimizer state
SAVE_DTYPES = ("float32", "float16", "bfloat16")
DATA_PARALLEL = ("fsdp", "ddp")  # PyTorch under torchrun: FSDP2 or DistributedDataParallel
LOG_NAME = "training_log.jsonl"
STATE_NAME = "training_state.json"
STATE_VERSION = 1


# ----- options


@dataclasses.dataclass
class TrainOptions:
    """Every option of a training run: the `opt-lm train` flags, and the arguments of each framework's `train`.

    Args:
        train_files: the training data (text files for a causal LM; see `opt_core.data` for the other tasks).
        output: the folder written: model, tokenizer, generation config, log and resumable state.
        eval_files: held-out data; None holds out `eval_fraction` of the training data.
        task: one of TASKS; the saved config gets its head.
        init_from: fine-tune this folder or hub id; None trains a fresh model.
        config: config.json path or preset name for a fresh model; None uses a small default shape.
        tokenizer: tokenizer folder; None reuses init_from's, or trains a BPE of `vocab_size` on the data.
        steps: optimizer updates.
        batch_size: rows of each micro-batch; a step takes `batch_size * grad_accum` rows.
        grad_accum: micro-batches accumulated into each update.
        learning_rate, warmup_steps, schedule: the peak rate, linear warmup from 0, then "linear" or "cosine" decay
            to 0 at `steps` (HF's get_linear/cosine_schedule_with_warmup).
        weight_decay: AdamW's decoupled decay, on every parameter `decays` names.
        clip_norm: clip the accumulated gradient to this global norm; None does not clip.
        adam_beta1, adam_beta2, adam_epsilon: AdamW's (HF Trainer's defaults).
        seq_len: tokens per causal-LM row, the leading `</s>` included.
        max_length, stride: rows and window overlap of the classification and QA tasks.
        eval_fraction: the share of the training data held out when there are no eval_files.
        eval_every, save_every, log_every: steps between evaluations, checkpoints and `train` log records.
        seed: seeds initialisation, dropout and the data order.
        shuffle: False takes the batches in file order.
        dtype: "float32", or "bfloat16" for mixed precision (bf16 compute, fp32 weights and optimizer state).
        dropout: apply the config's dropout while training.
        resume: continue from `output`'s checkpoint.
        save_dtype: dtype of the saved weights (resuming stays exact: the state keeps float32 weights then).
        vocab_size: the vocabulary of a freshly trained tokenizer.
        lora_r: train a LoRA adapter of this rank on the frozen model instead of every weight; the output is a
            PEFT adapter folder (adapter_config.json, adapter_model.safetensors). None trains every weight.
        lora_alpha, lora_dropout: the adapter's scaling numerator and dropout (PEFT's defaults).
        lora_target: the modules it wraps (PEFT's target_modules: names, or "all-linear").
        mesh: the devices to train on, as "data=4,model=2" (`parse_mesh`): Flax shards the params and optimizer
            state over a ("data", "model") device mesh and the batch over "data"; Keras on TensorFlow replicates
            the model over "data" devices (`tf.distribute.MirroredStrategy`, no "model" axis). The product of
            the sizes is the device count. None trains on one device (Keras: or under the strategy in scope).
        data_parallel: PyTorch under torchrun: "fsdp" (FSDP2's fully_shard per decoder layer) or "ddp"
            (DistributedDataParallel); one process ignores it.
    """

    train_files: list[Path]
    output: Path
    eval_files: list[Path] | None = None
    task: str = "causal-lm"
    init_from: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seq_len: int = 128
    max_length: int = 256
    stride: int = 64
    eval_fraction: float = 0.02
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    shuffle: bool = True
    dtype: str = "float32"
    dropout: bool = True
    resume: bool = False
    save_dtype: str = "float32"
    vocab_size: int = 4096
    lora_r: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    lora_target: list[str] | str = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    mesh: str | None = None
    data_parallel: str = "fsdp"

    def __post_init__(self) -> None:
        self.train_files = [Path(f) for f in self.train_files]
        self.eval_files = None if self.eval_files is None else [Path(f) for f in self.eval_files]
        self.output = Path(self.output)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every"):
            _require(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "a positive integer")
        for name in ("warmup_steps", "seed"):
            _require(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 0, "an integer >= 0")
        _require(self, "seq_len", _is_int(self.seq_len) and self.seq_len >= 2, "an integer >= 2")
        _require(self, "max_length", _is_int(self.max_length) and self.max_length >= 2, "an integer >= 2")
        if self.task == "question-answering":  # the only task that splits rows into overlapping windows
            _require(self, "stride", _is_int(self.stride) and 0 <= self.stride < self.max_length, "in [0, max_length)")
        _require(self, "vocab_size", _is_int(self.vocab_size) and self.vocab_size >= 260, "an integer >= 260")
        _require(self, "learning_rate", _is_real(self.learning_rate) and self.learning_rate > 0, "positive")
        _require(self, "weight_decay", _is_real(self.weight_decay) and self.weight_decay >= 0, ">= 0")
        _require(self, "clip_norm", self.clip_norm is None or _is_real(self.clip_norm) and self.clip_norm > 0, "> 0")
        for name in ("adam_beta1", "adam_beta2"):
            _require(self, name, _is_real(getattr(self, name)) and 0 <= getattr(self, name) < 1, "in [0, 1)")
        _require(self, "adam_epsilon", _is_real(self.adam_epsilon) and self.adam_epsilon > 0, "positive")
        _require(self, "eval_fraction", _is_real(self.eval_fraction) and 0 <= self.eval_fraction < 1, "in [0, 1)")
        _require(self, "task", self.task in TASKS, f"one of {', '.join(TASKS)}")
        _require(self, "schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}")
        _require(self, "dtype", self.dtype in COMPUTE_DTYPES, f"one of {', '.join(COMPUTE_DTYPES)}")
        _require(self, "save_dtype", self.save_dtype in SAVE_DTYPES, f"one of {', '.join(SAVE_DTYPES)}")
        if self.lora_r is not None:
            if not self.init_from:
                raise ConfigError("a LoRA run (lora_r) adapts a trained model: give init_from (--model)")
            self.lora_config()  # checks r, alpha, dropout and the targets' form
        if self.mesh is not None:
            parse_mesh(self.mesh)
        _require(self, "data_parallel", self.data_parallel in DATA_PARALLEL, f"one of {', '.join(DATA_PARALLEL)}")

    def lora_config(self) -> LoraConfig | None:
        """The adapter a LoRA run trains (PEFT's task type of the head; its head in modules_to_save), or None."""
        if self.lora_r is None:
            return None
        target = self.lora_target
        if isinstance(target, (list, tuple)) and len(target) == 1 and target[0].lower() == "all-linear":
            target = target[0]
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=target if isinstance(target, str) else list(target),
            base_model_name_or_path=str(self.init_from),
        ).for_head(self.head)

    @property
    def head(self) -> str:
        return HEAD_OF_TASK[self.task]

    def to_json(self) -> dict[str, Any]:
        """The options as JSON values (paths as strings), as the checkpoint records them; without `output`, the
        folder the checkpoint is in (so a checkpoint's bytes do not depend on where it lies)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "output"}
        return json.loads(json.dumps(fields, default=str))


MESH_AXES = ("data", "model")  # the batch is split over "data", the weights (tensor parallel) over "model"


def parse_mesh(text: str) -> dict[str, int]:
    """{"data": size, "model": size} of a mesh given as "data=4,model=2" (an axis left out has size 1).

    Raises:
        ConfigError: naming the text, for an unknown or repeated axis name or a size that is not an integer >= 1.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in str(text).split(","):
        name, _, size = part.strip().partition("=")
        if name not in MESH_AXES or name in seen:
            what = "repeats" if name in seen else "has an unknown axis"
            raise ConfigError(f"mesh {text!r} {what} {name!r}: write e.g. 'data=4,model=2' (axes: data, model)")
        if not size.strip().isdigit() or int(size) < 1:
            raise ConfigError(f"mesh {text!r}: the size of {name!r} must be an integer >= 1, got {size!r}")
        sizes[name] = int(size)
        seen.add(name)
    return sizes


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating)) and math.isfinite(value)


def _require(options: TrainOptions, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {what}, got {getattr(options, name)!r}")


# ----- the optimizer's formula, shared by the three frameworks


def learning_rate(step: int, options: TrainOptions) -> float:
    """The rate of update `step` (0-based): HF's get_linear_schedule_with_warmup /
    get_cosine_schedule_with_warmup (half a cosine period) to 0 at `options.steps`, times the peak rate."""
    warmup, total = options.warmup_steps, options.steps
    if step < warmup:
        return options.learning_rate * (step / max(1, warmup))
    progress = (step - warmup) / max(1, total - warmup)
    if options.schedule == "linear":
        return options.learning_rate * max(0.0, (total - step) / max(1, total - warmup))
    # HF's num_cycles=0.5, in HF's order of operations so that the floats agree exactly
    return options.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def decays(canonical_name: str) -> bool:
    """Whether AdamW decays this parameter: HF Trainer's rule, everything but biases and LayerNorm weights
    (`opt_core.weights` canonical names; the embeddings and the task heads' weights decay)."""
    if canonical_name.endswith(".bias"):
        return False
    module = canonical_name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return not module.endswith("layer_norm")


# ----- the framework's part


class Trainer(Protocol):
    """What a framework implements for `run_training` (its model, optimizer and compiled steps).

    `optimizer_file` names the file of its optimizer state in the checkpoint (e.g. "optimizer.msgpack"). A trainer
    of one process of several may set `is_main_process`: False keeps that process from writing the log.
    """

    optimizer_file: str

    def train_step(self, batch: Mapping[str, np.ndarray], learning_rate: float, step: int) -> float:
        """One update at this rate over the step's micro-batches (every array [A, B, ...]); returns the mean loss
        of the step's loss terms before the update. `step` (0-based) seeds its dropout."""

    def eval_outputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs on one eval batch (arrays [B, ...], no dropout): "loss_sum" and "loss_count" per
        row (0 where the batch has no targets), and the task's outputs for `opt_core.data.evaluate` ("logits",
        or "start_logits" and "end_logits"), as float32."""

    def optimizer_state(self) -> bytes:
        """The optimizer's state (and, with a lossy save dtype, the float32 weights) as bytes."""

    def save(self, folder: Path, extra_files: Mapping[str, bytes]) -> None:
        """`save_pretrained(folder, ..., dtype=save_dtype, extra_files=extra_files)` in one commit."""

    def restore(self, folder: Path, optimizer_state: bytes) -> None:
        """Loads the weights of `folder` and this optimizer state (from `optimizer_state()`)."""


# ----- the log


class TrainingLog:
    """`training_log.jsonl`: one JSON object per line, {"event": "train", "step", "loss", "learning_rate",
    "tokens_per_s"} every `log_every` steps and {"event": "eval", "step", "eval_loss", ...metrics}. A resumed
    run cuts it back to the checkpoint's length and appends. With `write=False` (a process other than rank 0 of a
    distributed run) it leaves the file alone."""

    def __init__(self, folder: Path, offset: int | None, write: bool = True):
        self.path = Path(folder) / LOG_NAME
        self.write = write
        if not write:
            return
        if offset is None:
            self.path.write_bytes(b"")
        elif self.path.is_file() and self.path.stat().st_size > offset:
            with self.path.open("r+b") as f:
                f.truncate(offset)

    @property
    def offset(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def train(self, step: int, loss: float, rate: float, tokens_per_s: float) -> None:
        self._write({"event": "train", "step": step, "loss": loss, "learning_rate": rate, "tokens_per_s": tokens_per_s})

    def eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"event": "eval", "step": step, **metrics})

    def _write(self, record: dict) -> None:
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """A tqdm bar on stderr with the step's loss and tokens per second (since this process started)."""

    def __init__(self, total: int, start: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, file=sys.stderr, unit="step", dynamic_ncols=True)
        self.tokens, self.started, self.rate = 0, time.perf_counter(), 0.0

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        self.rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.rate:,.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


# ----- checkpoints


@dataclasses.dataclass
class TrainingState:
    """`training_state.json`: the step a checkpoint resumes from, the options it ran with, the log's length."""

    step: int
    options: dict[str, Any]
    log_offset: int
    version: int = STATE_VERSION

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=2) + "\n").encode()


def checkpoint_files(state: TrainingState, optimizer_file: str, optimizer_state: bytes) -> dict[str, bytes]:
    """The files a checkpoint commits beside the model folder (the tokenizer's files are added by the caller)."""
    return {STATE_NAME: state.to_bytes(), optimizer_file: optimizer_state}


def read_checkpoint(folder: Path, optimizer_file: str) -> tuple[TrainingState, bytes]:
    """The state and optimizer bytes of `folder`'s checkpoint; a save killed after its commit point is finished
    first. Raises ConfigError when there is none."""
    folder = Path(folder)
    complete_interrupted_save(folder)
    path, optimizer_path = folder / STATE_NAME, folder / optimizer_file
    if not path.is_file() or not optimizer_path.is_file():
        raise ConfigError(f"--resume: {folder} holds no checkpoint ({STATE_NAME}); train without --resume first")
    try:
        raw = json.loads(path.read_text())
        state = TrainingState(int(raw["step"]), dict(raw["options"]), int(raw["log_offset"]), int(raw["version"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--resume: {path} is not a training state ({error})") from None
    if state.version != STATE_VERSION:
        raise ConfigError(f"--resume: {path} has version {state.version}; this version reads {STATE_VERSION}")
    return state, optimizer_path.read_bytes()


# The options that decide which rows each step takes: resuming with others would not continue the run.
DATA_ORDER_OPTIONS = ("task", "batch_size", "grad_accum", "seed", "shuffle", "seq_len", "max_length", "stride")


def check_resumable(state: TrainingState, options: TrainOptions) -> None:
    """Refuses to resume with options that change the batches (the schedule's may change: e.g. more steps)."""
    now = options.to_json()
    changed = [name for name in DATA_ORDER_OPTIONS if name in state.options and state.options[name] != now[name]]
    if changed:
        what = ", ".join(f"{name}={now[name]!r} (the checkpoint's: {state.options[name]!r})" for name in changed)
        raise ConfigError(f"--resume with {what} would not continue the checkpoint's batches; keep its values")


def save_checkpoint(trainer: Trainer, options: TrainOptions, step: int, log_offset: int, extra: Mapping) -> None:
    """Commits the model, tokenizer (`extra`), optimizer state and training state of `step` in one commit."""
    state = TrainingState(step, options.to_json(), log_offset)
    files = checkpoint_files(state, trainer.optimizer_file, trainer.optimizer_state())
    trainer.save(options.output, {**files, **extra})


# ----- the loop


def train_with(options: TrainOptions, build_model: Callable, make_trainer: Callable[[Any], Trainer]) -> dict:
    """The run every framework's `train(options)` makes, given how that framework builds its model
    (`build_model(options, tokenizer, config_updates)`) and its trainer (`make_trainer(model)`): the data files
    checked, the output folder made (an interrupted save in it finished), the tokenizer and data built, then
    `run_training`. Returns the last evaluation."""
    check_files("train_files", options.train_files, required=True)
    check_files("eval_files", options.eval_files, required=False)
    options.output.mkdir(parents=True, exist_ok=True)
    complete_interrupted_save(options.output)
    tokenizer = build_tokenizer(options)
    data = load_data(options, tokenizer)
    model = build_model(options, tokenizer, data.config_updates)
    if options.lora_r is not None:
        # The same seed gives the same fresh adapter in every framework (opt_core.adapters.init_lora_weights).
        model.add_adapter(options.lora_config(), seed=options.seed)
    return run_training(options, data, make_trainer(model), tokenizer_files(tokenizer))


def run_training(options: TrainOptions, data: TaskData, trainer: Trainer, extra_files: Mapping[str, bytes]) -> dict:
    """Trains `trainer` on `data` (an `opt_core.data.TaskData`: `train` and `eval` dicts of row-aligned arrays)
    as `options` say; returns the last evaluation (or {"step"} when there is no eval data).

    Args:
        options: the run's options.
        data: the task's rows.
        trainer: the framework's half (`Trainer`), built with the task's head and config updates.
        extra_files: committed with every checkpoint (the tokenizer's files).
    """
    options.output.mkdir(parents=True, exist_ok=True)
    start, log_offset = 0, None
    if options.resume:
        state, optimizer_bytes = read_checkpoint(options.output, trainer.optimizer_file)
        check_resumable(state, options)
        trainer.restore(options.output, optimizer_bytes)
        start, log_offset = state.step, state.log_offset
    # In a distributed run every process steps, and only the main one (rank 0) writes the log and checkpoints.
    log = TrainingLog(options.output, log_offset, write=getattr(trainer, "is_main_process", True))
    num_rows = len(data.train["input_ids"])
    rows_per_step = options.batch_size * options.grad_accum
    progress = Progress(options.steps, start)
    last_eval: dict[str, float] = {}
    for step in range(start, options.steps):
        rows = batch_indices(num_rows, rows_per_step, step, options.seed, options.shuffle)
        shape = (options.grad_accum, options.batch_size)
        batch = {k: v[rows].reshape(*shape, *v.shape[1:]) for k, v in data.train.items()}
        rate = learning_rate(step, options)
        loss = float(trainer.train_step(batch, rate, step))
        progress.update(step + 1, loss, _tokens(batch))
        if (step + 1) % options.log_every == 0:
            log.train(step + 1, loss, rate, progress.rate)
        done = step + 1 == options.steps
        if data.eval is not None and ((step + 1) % options.eval_every == 0 or done):
            last_eval = evaluate(options, data, trainer)
            log.eval(step + 1, last_eval)
        if (step + 1) % options.save_every == 0 or done:
            save_checkpoint(trainer, options, step + 1, log.offset, extra_files)
    progress.close()
    return {"step": max(start, options.steps), **last_eval}


def _tokens(batch: Mapping[str, np.ndarray]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].size)


def evaluate(options: TrainOptions, data: TaskData, trainer: Trainer, task_metrics: Callable = task_evaluate) -> dict:
    """{"eval_loss" (where the rows have targets), ...the task's metrics} over `data.eval`, in batches of
    `batch_size` rows (the last one padded with repeats of its last row, so the framework sees one shape, and the
    padding's outputs dropped)."""
    num_rows = len(data.eval["input_ids"])
    outputs: dict[str, list[np.ndarray]] = {}
    for begin in range(0, num_rows, options.batch_size):
        rows = np.arange(begin, min(begin + options.batch_size, num_rows))
        padded = np.concatenate([rows, np.full(options.batch_size - len(rows), rows[-1])])
        for name, array in trainer.eval_outputs({k: v[padded] for k, v in data.eval.items()}).items():
            outputs.setdefault(name, []).append(np.asarray(array)[: len(rows)])
    merged = {name: np.concatenate(arrays) for name, arrays in outputs.items()}
    loss_sum, count = float(merged.pop("loss_sum").sum()), float(merged.pop("loss_count").sum())
    # QA's eval rows carry no answer positions, hence no loss: eval_loss is left out then, as HF's evaluation does.
    totals = {"loss_sum": loss_sum, "token_count": count} if count > 0 else {}
    metrics: dict[str, float] = {"eval_loss": loss_sum / count} if count > 0 else {}
    metrics.update({k: float(v) for k, v in task_metrics(data, {**merged, **totals}).items()})
    return metrics


def check_files(option: str, files: Sequence[Path] | None, required: bool) -> None:
    """The data files exist (before anything is written)."""
    if required and not files:
        raise ConfigError(f"{option} must name at least one file")
    for file in files or ():
        if not Path(file).is_file():
            raise ConfigError(f"{option} {file}: no such file")


# ----- what every framework builds the same way: tokenizer, data, config


# A small default shape: ~3.4M parameters with a 4096-token vocabulary (under 7 MB in float16).
SMALL_SHAPE = dict(
    hidden_size=224,
    num_hidden_layers=4,
    num_attention_heads=4,
    ffn_dim=896,
    max_position_embeddings=256,
    dropout=0.0,
)


def build_tokenizer(options: TrainOptions) -> OPTTokenizer:
    """The given tokenizer, init_from's, the checkpoint's when resuming, or a BPE trained on the data."""
    if options.tokenizer or options.init_from:
        return OPTTokenizer.from_pretrained(options.tokenizer or options.init_from)
    if options.resume and (options.output / "tokenizer.json").is_file():
        return OPTTokenizer.from_pretrained(options.output)
    # Trained aside: the output folder gets the tokenizer's files only in a checkpoint's commit, with the weights.
    with tempfile.TemporaryDirectory() as folder:
        return train_bpe_tokenizer([str(f) for f in options.train_files], options.vocab_size, folder)


def tokenizer_files(tokenizer: OPTTokenizer) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer's folder, committed with every checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        return {Path(path).name: Path(path).read_bytes() for path in tokenizer.save_pretrained(folder)}


def fresh_config(options: TrainOptions, tokenizer: OPTTokenizer, config_updates: Mapping[str, Any]) -> OPTConfig:
    """The config of a fresh model: `options.config` (a config.json or a preset) or SMALL_SHAPE, with the
    tokenizer's vocabulary and special ids and the task's updates (num_labels, id2label...)."""
    if options.config and Path(options.config).is_file():
        config = OPTConfig.from_pretrained(options.config)
    elif options.config:
        config = OPTConfig.from_preset(options.config)
    else:
        config = OPTConfig(**SMALL_SHAPE)
    return config.replace(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_updates,
    )


def check_length(options: TrainOptions, config: OPTConfig) -> None:
    """The rows fit the position table."""
    name, length = ("seq_len", options.seq_len) if options.task == "causal-lm" else ("max_length", options.max_length)
    if length > config.max_position_embeddings:
        raise ConfigError(f"{name} {length} exceeds max_position_embeddings {config.max_position_embeddings}")


TextRows = TaskData  # the name this module's first tests gave causal-LM rows


def load_data(options: TrainOptions, tokenizer: OPTTokenizer) -> TaskData:
    """The task's rows as the options say (`opt_core.data.load_task_data`)."""
    return load_task_data(
        options.task,
        options.train_files,
        options.eval_files,
        tokenizer,
        seq_len=options.seq_len,
        max_length=options.max_length,
        stride=options.stride,
        eval_fraction=options.eval_fraction,
        seed=options.seed,
    )
