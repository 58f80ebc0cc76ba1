"""Training and fine-tuning in PyTorch with `torch.optim.AdamW`: the torch step of `opt_core.training`.

Everything but the step is framework-free and lives in `opt_core.training`: options, HF's warmup + linear/cosine
schedule, the weight-decay rule, data, the log and progress bar, checkpoints and resume. Here: a plain loop over the
step's micro-batches (summed losses, gradients accumulated by `backward`, divided by the step's count of loss
terms), clipping by global norm (`clip_grad_norm_`), then `torch.optim.AdamW` with two param groups (no decay where
`opt_core.training.decays` says so) and the step's rate set on both. bf16 mixed precision is `torch.autocast` over
float32 weights and optimizer state; `torch.compile` of the forward is optional.

LoRA (a model with an active adapter, `opt_torch.lora`): the optimizer holds only the parameters with requires_grad,
which `add_adapter` leaves to the adapter's LoRA tensors, modules_to_save copies and trained biases, keyed by their
canonical adapter names (`opt_core.adapters`); a checkpoint is then PEFT's adapter folder (float32, beside the
trainer's files) and resuming rebuilds the base from `init_from` and reads the adapter back.

The optimizer state is a safetensors file keyed by canonical names (`exp_avg/<name>`, `exp_avg_sq/<name>`,
`step/<name>`, and `master/<name>` float32 weights when the saved weights are rounded): no pickle, so a checkpoint
is read back without `torch.load`.

Under `torchrun` (several processes), `train` joins the process group and trains data-parallel
(`opt_torch.distributed`): FSDP2's `fully_shard` per decoder layer (`options.data_parallel="fsdp"`, the default) or
DDP ("ddp"). Each process takes its contiguous share of every micro-batch, so together they take the one-process
batch, and each backward is scaled so that the averaged gradient is the one-process step's; the logged loss is summed
over the processes. Checkpoints are the normal full ones: gathered on every rank, written once by rank 0.

Siblings: `opt_flax/train.py` (optax), `opt_tf/train.py`. Entry point: `train(options)` or `train(**options)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from opt_core import pretrained as core
from opt_core.adapters import from_file_tensors, read_adapter, write_adapter
from opt_core.errors import CheckpointError, ConfigError
from opt_core.generation import GenerationConfig
from opt_core.heads import problem_type
from opt_core.training import (
    ARCHITECTURE_OF_HEAD,
    EVAL_OUTPUTS,
    TrainOptions,
    check_length,
    decays,
    fresh_config,
    train_with,
)
from opt_torch import distributed
from opt_torch.arrays import numpy_to_torch, torch_to_numpy
from opt_torch.lora import is_adapter_name
from opt_torch.modeling import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification

TrainConfig = TrainOptions  # the name `opt-lm train` and older callers use (as in opt_flax.train)
OPTIMIZER_NAME = "optimizer.safetensors"
MODEL_OF_HEAD = {
    "causal_lm": OPTForCausalLM,
    "sequence_classification": OPTForSequenceClassification,
    "question_answering": OPTForQuestionAnswering,
}
_INPUTS = ("input_ids", "attention_mask", "labels", "start_positions", "end_positions")
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")

__all__ = [
    "TorchTrainer",
    "TrainConfig",
    "TrainOptions",
    "build_model",
    "build_optimizer",
    "train",
    "trained_parameters",
]


def train(options: TrainOptions | None = None, *, device: str | None = None, compile: bool = False, **flags) -> dict:
    """Runs a training (`opt-lm train --framework torch`): `train(TrainOptions(...))` or `train(train_files=...,
    output=..., ...)` with the flags' names; returns the last evaluation. The log is `output/training_log.jsonl`.

    Under torchrun, every process runs this; they train data-parallel (`options.data_parallel`) and rank 0 writes.

    Args:
        options: the run's options (or give them as keywords).
        device: where to train ("cuda", "cpu", ...); default CUDA when available (under torchrun, this rank's GPU).
        compile: `torch.compile` the model's forward.
    """
    options = options if options is not None else TrainOptions(**flags)
    if options.mesh is not None:
        raise ConfigError(
            f"mesh={options.mesh!r} is for the Flax and Keras trainers; PyTorch trains data parallel when started "
            "under torchrun (options.data_parallel 'fsdp' or 'ddp')"
        )
    joined = distributed.launched_by_torchrun() and not torch.distributed.is_initialized()
    if distributed.launched_by_torchrun():
        rank_device = distributed.init_distributed()
        device = device or rank_device
    try:
        return train_with(
            options, build_model, lambda model: TorchTrainer(model, options, device=device, compile=compile)
        )
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def build_model(options: TrainOptions, tokenizer, config_updates: Mapping[str, Any]):
    """The float32 model of the task's head: the checkpoint's when resuming, init_from's, or a fresh one. A head
    the checkpoint lacks is drawn by `opt_core.pretrained` from `options.seed`, the same numbers as Flax's."""
    cls = MODEL_OF_HEAD[options.head]
    if options.resume or options.init_from:
        # A LoRA checkpoint holds the adapter only: the base is init_from's again, the adapter restored on top.
        from_output = options.resume and options.lora_r is None
        source = options.output if from_output else options.init_from
        model = load_model(cls, source, options.seed, **config_updates)
    else:
        torch.manual_seed(options.seed)
        model = cls(fresh_config(options, tokenizer, config_updates))
    check_length(options, model.config)
    return model


def load_model(cls, source, seed: int, **config_updates):
    """`cls.from_pretrained(source)` in float32, with a missing head drawn from `seed` (not torch's RNG)."""
    loaded = core.load_pretrained(source, cls.head, seed=seed, **config_updates)
    with torch.device("meta"):
        model = cls(loaded.config)
    model._assign(loaded.tensors, torch.float32, "cpu")
    if hasattr(model, "generate"):
        model.generation_config = loaded.generation_config
    return model


def canonical_parameters(model) -> dict[str, torch.nn.Parameter]:
    """{canonical name: parameter} of the base model, a tied head once (under `embed_tokens`, as HF Trainer sees
    it); an adapter's tensors are not among them."""
    prefix = "model." if model.head == "base" else ""  # `opt_core.weights.module_path`, inverted
    return {prefix + name: param for name, param in model.named_parameters() if not is_adapter_name(name)}


def trained_parameters(model) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of what training updates: the parameters with requires_grad, the base's under canonical
    names and the active adapter's under its canonical adapter names (`{module}.lora_A.weight`, its
    modules_to_save copies under the names of the parameters they stand for)."""
    params = canonical_parameters(model)
    if model.active_adapter is not None:
        params.update(model.adapter_parameters())
    trained = {name: param for name, param in params.items() if param.requires_grad}
    if not trained:
        raise ConfigError("nothing to train: every parameter is frozen (an adapter loaded with is_trainable=False?)")
    return trained


def build_optimizer(model, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW over the trained parameters (`trained_parameters`: requires_grad only) with HF Trainer's two groups:
    decay on the parameters `decays` names, none on biases and norms. The rate is set on both groups before each
    update."""
    params = trained_parameters(model)
    groups = [
        {"params": [p for n, p in params.items() if decays(n)], "weight_decay": options.weight_decay},
        {"params": [p for n, p in params.items() if not decays(n)], "weight_decay": 0.0},
    ]
    betas = (options.adam_beta1, options.adam_beta2)
    # The fused kernel (HF Trainer's default since torch 2.8) is the same update in one pass over the weights: on
    # opt-125m on CPU it took 0.4-0.7 s a step where the for-loop kernel took 2.4-3.6 s (benchmarks/train_step.py).
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = {"fused": True} if devices <= {"cpu", "cuda"} else {}
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=options.adam_epsilon, **fused)


# ----- losses: (per-row sum of the loss terms, their count), so micro-batches add up to the whole step's mean


def causal_lm_losses(out, batch, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token cross-entropy over labels != -100 (HF's shift), and the count of terms."""
    labels = batch["labels"][:, 1:]  # B T-1
    logits = out.logits[:, :-1].float()  # B T-1 V
    # The vocabulary as the last dimension of a 2-D input: half the time of a B V T-1 input on opt-125m's 50272.
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return flat.view(labels.shape).sum(-1), (labels != -100).sum(-1).float()


def classification_losses(out, batch, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: HF's loss of the problem type (`opt_core.heads.problem_type`): cross-entropy of the label, the
    squared error of a regression, or the mean binary cross-entropy over the labels of a multi-label row."""
    labels, logits = batch["labels"], out.logits.float()
    kind = problem_type(config, logits.shape[-1], not labels.is_floating_point())
    if kind == "regression":
        losses = ((logits.reshape(labels.shape) - labels.float()) ** 2).reshape(len(logits), -1).mean(-1)
    elif kind == "single_label_classification":
        losses = F.cross_entropy(logits, labels.long(), reduction="none")
    else:
        losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    return losses, torch.ones_like(losses)


def question_answering_losses(out, batch, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the mean of the start and end positions' cross-entropies (positions past the row are ignored,
    as HF's clamp to an ignored index); no terms where the batch has no positions (QA's eval rows)."""
    if "start_positions" not in batch:
        zeros = torch.zeros(out.start_logits.shape[0], device=out.start_logits.device)
        return zeros, zeros
    length = out.start_logits.shape[-1]
    losses, counts = 0.0, 0.0
    for logits, positions in ((out.start_logits, batch["start_positions"]), (out.end_logits, batch["end_positions"])):
        valid = ((positions >= 0) & (positions < length)).float()
        picked = F.cross_entropy(logits.float(), positions.clamp(0, length - 1), reduction="none")
        losses, counts = losses + 0.5 * picked * valid, counts + 0.5 * valid
    return losses, counts


LOSSES = {
    "causal_lm": causal_lm_losses,
    "sequence_classification": classification_losses,
    "question_answering": question_answering_losses,
}


def term_counts(head: str, batch: Mapping[str, np.ndarray]) -> float:
    """The step's count of loss terms, from its targets alone (known before the forward, so that each
    micro-batch's backward is already scaled to the step's mean: with one micro-batch, HF's loss exactly)."""
    if head == "causal_lm":
        return float((batch["labels"][..., 1:] != -100).sum())
    if head == "sequence_classification":
        return float(np.prod(batch["labels"].shape[:2]))
    length = batch["input_ids"].shape[-1]
    valid = [(p >= 0) & (p < length) for p in (batch["start_positions"], batch["end_positions"])]
    return float(0.5 * valid[0].sum() + 0.5 * valid[1].sum())


# ----- the trainer


class TorchTrainer:
    """`opt_core.training.Trainer` in PyTorch: the model (float32 master weights) and its AdamW.

    In a process group (`torch.distributed`), the model is sharded (FSDP2) or wrapped (DDP) as
    `options.data_parallel` says, and each process takes its share of every micro-batch.

    Args:
        model: an `opt_torch` model with a task head (float32).
        options: the run's options.
        device: where to train; default CUDA when available, else CPU.
        compile: `torch.compile` the model's forward (the step's shapes are static, so it compiles once).
    """

    optimizer_file = OPTIMIZER_NAME

    def __init__(self, model, options: TrainOptions, device: str | torch.device | None = None, compile: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.options = model.to(device=self.device, dtype=torch.float32), options
        self.is_main_process = distributed.is_main_process()
        self.forward = self.model
        if torch.distributed.is_initialized():
            if model.active_adapter is not None:
                raise ConfigError("LoRA training is not supported under torchrun yet: train it in one process")
            distributed.local_rows(options.batch_size)  # refuses a batch the processes cannot share evenly
            self.forward = distributed.shard_for_training(self.model, options.data_parallel, self.device)
        self.params = trained_parameters(self.model)  # after sharding: FSDP2 replaces the parameters
        self.optimizer = build_optimizer(self.model, options)
        self.dropout = options.dropout and _has_dropout(model)
        if compile:
            self.forward = torch.compile(self.forward)
        self.loss_terms, self.output_names = LOSSES[model.head], EVAL_OUTPUTS[model.head]
        self.autocast_dtype = torch.bfloat16 if options.dtype == "bfloat16" else None

    def train_step(self, batch: Mapping[str, np.ndarray], learning_rate: float, step: int) -> float:
        count = max(term_counts(self.model.head, batch), 1.0)  # of the whole step, over every process's rows
        rows = distributed.local_rows(batch["input_ids"].shape[1])
        # DDP and FSDP2 average the processes' gradients; the step's mean wants their sum.
        scale = distributed.data_parallel_size()
        self.model.train(self.dropout)
        total = torch.zeros((), dtype=torch.float64)
        with self._dropout_seed(step):
            for index in range(len(batch["input_ids"])):  # the step's micro-batches, [B, ...] each
                micro_batch = self._tensors({k: v[index, rows] for k, v in batch.items()})
                with self._autocast():
                    out = self.forward(micro_batch["input_ids"], micro_batch.get("attention_mask"))
                losses, _ = self.loss_terms(out, micro_batch, self.model.config)
                loss_sum = losses.sum()
                (loss_sum / count * scale).backward()  # gradients add up over micro-batches to the step's mean's
                total += loss_sum.detach().double().cpu()
        total = distributed.all_sum(total)
        if self.options.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.options.clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total / count)

    def eval_outputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.model.eval()
        inputs = self._tensors(batch)  # every process evaluates the whole batch (FSDP2 gathers the weights)
        with torch.no_grad(), self._autocast():
            out = self.forward(inputs["input_ids"], inputs.get("attention_mask"))
            losses, counts = self.loss_terms(out, inputs, self.model.config)
        outputs = {name: getattr(out, name).float() for name in self.output_names}
        outputs.update(loss_sum=losses.float(), loss_count=counts.float())
        distributed.reshard(self.model)  # FSDP2 keeps the root's weights gathered after a forward without backward
        return {name: value.cpu().numpy() for name, value in outputs.items()}

    def optimizer_state(self) -> bytes:
        return optimizer_bytes(self.optimizer, self.params, self.options.save_dtype)

    def save(self, folder: Path, extra_files: Mapping[str, bytes]) -> None:
        if self.model.active_adapter is not None:
            plan, tensors = self.model.adapter_arrays()
            write_adapter(folder, plan, tensors, extra_files=extra_files)
        else:
            save_model(folder, self.model, self.options.save_dtype, extra_files)
        distributed.barrier()  # every process returns once rank 0's commit is in place

    def restore(self, folder: Path, optimizer_state: bytes) -> None:
        if self.model.active_adapter is not None:
            copy_weights(self.model.adapter_parameters(), adapter_checkpoint(folder, self.model))
        else:
            copy_weights(self.params, core.load_pretrained(folder, self.model.head).tensors)
        restore_optimizer(self.optimizer, self.params, optimizer_state, self.options.save_dtype)

    def _tensors(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The model's inputs and targets: integer arrays as int64 (what cross-entropy takes), floats as float32."""
        tensors = {}
        for name in _INPUTS:
            if name in batch:
                array = np.asarray(batch[name])
                array = array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32)
                tensors[name] = torch.from_numpy(array).to(self.device)
        return tensors

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _dropout_seed(self, step: int):
        """Dropout's draws a function of (seed, step), so a resumed run draws what an uninterrupted one does; the
        caller's random state is left as it was."""
        if not self.dropout:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # Each process draws its own masks for its own rows (one process: the (seed, step) draws of old).
        entropy = [self.options.seed, step] + (
            [torch.distributed.get_rank()] if torch.distributed.is_initialized() else []
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
            yield


def _has_dropout(model) -> bool:
    """Whether training draws dropout: the config's, or the active adapter's lora_dropout."""
    names = ("dropout", "attention_dropout", "activation_dropout")
    lora = model.peft_config.get(model.active_adapter) if model.active_adapter is not None else None
    return any(getattr(model.config, name, 0.0) > 0 for name in names) or bool(lora and lora.lora_dropout > 0)


# ----- checkpoints (the commit is `opt_core.pretrained.save_pretrained`'s; the state is `opt_core.training`'s)


def optimizer_bytes(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], save_dtype: str) -> bytes:
    """AdamW's per-parameter state under canonical names, and the float32 weights when the saved weights are
    rounded (so that resuming is exact), as safetensors bytes. Sharded state is gathered tensor by tensor (every
    process calls this) and kept by the main process only; the others return b""."""
    tensors = {}
    keep = distributed.is_main_process()
    for name, param in params.items():
        for key, value in optimizer.state.get(param, {}).items():
            value = distributed.full(value.detach())
            if keep:
                tensors[f"{key}/{name}"] = value.reshape(-1) if key == "step" else value
        if save_dtype != "float32":
            value = distributed.full(param.detach())
            if keep:
                tensors[f"master/{name}"] = value
    if not keep:
        return b""
    return safetensors.torch.save({k: v.contiguous().cpu() for k, v in tensors.items()}, {"format": "opt_torch"})


def restore_optimizer(optimizer, params: Mapping[str, torch.nn.Parameter], data: bytes, save_dtype: str) -> None:
    """Loads `optimizer_bytes` into `optimizer` (and the float32 weights, if they were saved) in place."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{OPTIMIZER_NAME} is not a safetensors file of optimizer state ({error})") from None
    if save_dtype != "float32":
        copy_weights(params, {name: tensors[f"master/{name}"] for name in params if f"master/{name}" in tensors})
    optimizer.state.clear()
    for name, param in params.items():
        entries = {key: tensors.get(f"{key}/{name}") for key in _STATE_KEYS}
        if all(value is None for value in entries.values()):
            continue  # no update has touched it yet
        if any(value is None for value in entries.values()):
            raise CheckpointError(f"{OPTIMIZER_NAME}: the state of {name} lacks some of {list(_STATE_KEYS)}")
        optimizer.state[param] = {
            "step": entries["step"].reshape(()).to(torch.float32),  # torch keeps it a CPU scalar
            "exp_avg": distributed.like(param, entries["exp_avg"].to(param.device, param.dtype)),
            "exp_avg_sq": distributed.like(param, entries["exp_avg_sq"].to(param.device, param.dtype)),
        }


def copy_weights(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, Any]) -> None:
    """Copies canonical arrays (numpy or torch) into the parameters in place (the optimizer keeps them)."""
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {', '.join(missing)}")
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            value = value if isinstance(value, torch.Tensor) else numpy_to_torch(np.asarray(value), torch.float32)
            param.copy_(distributed.like(param, value.to(dtype=param.dtype, device=param.device)))


def adapter_checkpoint(folder: Path, model) -> dict[str, np.ndarray]:
    """The canonical tensors of the adapter saved in `folder`, checked against the model's active adapter."""
    _, file_tensors, source = read_adapter(folder)
    plan = model.adapter_state.plans[model.active_adapter]
    return from_file_tensors(plan, file_tensors, source)


def save_model(folder: Path, model, save_dtype: str, extra_files: Mapping[str, bytes]) -> None:
    """The model in HF's layout (config with its head, generation config) and `extra_files`, in one commit; in a
    process group, gathered tensor by tensor by every process and kept and written by rank 0 only."""
    keep, canonical = distributed.is_main_process(), {}
    for name, param in canonical_parameters(model).items():
        whole = distributed.full(param)
        if keep:
            canonical[name] = torch_to_numpy(whole)
    if not keep:
        return
    core.save_pretrained(
        folder,
        canonical,
        model.config,
        model.head,
        architecture=ARCHITECTURE_OF_HEAD[model.head],
        generation_config=GenerationConfig.from_model_config(model.config),
        fmt="safetensors",
        dtype=save_dtype,
        extra_files=extra_files,
    )
