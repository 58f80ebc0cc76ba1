"""Training and fine-tuning in Flax with optax: the Flax step of `opt_core.training` (`opt-lm train`).

Everything but the step is framework-free and lives in `opt_core.training`: options, HF's warmup + linear/cosine
schedule, the weight-decay rule, data, the log and progress bar, checkpoints and resume. Here: optax AdamW (the
rate injected per step by `inject_hyperparams`, no decay where `opt_core.training.decays` says so) after clipping
by global norm, a jit'd step that accumulates the summed loss and gradients over the step's micro-batches
(`lax.scan`), and a jit'd eval. bf16 mixed precision computes in bfloat16 over float32 params and optimizer state.

LoRA (a model with an active adapter, `opt_flax.lora`): the adapter's leaves are in the params pytree, and
`opt_flax.lora.trainable_mask` marks what trains (the LoRA tensors, modules_to_save copies, trained biases). The
optimizer is `optax.multi_transform` over that mask: clipping and AdamW see the trained leaves only (their global
norm is theirs, as torch's over requires_grad parameters), the frozen ones get zero updates and no optimizer state,
and the step stops their gradients so XLA computes none. A checkpoint is then PEFT's adapter folder (beside the
trainer's files), and resuming rebuilds the base from `init_from` and reads the adapter back.

On a device mesh (`options.mesh`, "data=4,model=2"; `opt-lm train --framework flax --mesh data=4,model=2`) the
params are placed by `opt_flax.sharding`'s partition rules (tensor parallel over "model"), each optax moment like
its param, and each step's batch split over its rows on "data"; the steps are jitted with those shardings as their
in and out shardings, so XLA inserts the collectives. A step sees the same global batch as on one device: the losses
are one device's up to float32 summation order (tests/test_flax_mesh_train.py measures it). Checkpoints are the
same full checkpoint (gathered on save) and resume onto any mesh.

Siblings: `opt_torch/train.py`, `opt_tf/train.py`. Entry point: `train(options)` or `train(**options)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opt_core.adapters import load_adapter_tensors, write_adapter
from opt_core.errors import ConfigError
from opt_core.generation import GenerationConfig
from opt_core.heads import problem_type
from opt_core.pretrained import save_pretrained as save_folder
from opt_core.training import (
    ARCHITECTURE_OF_HEAD,
    EVAL_OUTPUTS,
    TrainingState,
    TrainOptions,
    check_length,
    checkpoint_files,
    decays,
    fresh_config,
    parse_mesh,
    read_checkpoint,
    tokenizer_files,
    train_with,
)
from opt_flax.lora import COPY, to_leaves
from opt_flax.modeling import FlaxOPTForCausalLM, FlaxOPTForQuestionAnswering, FlaxOPTForSequenceClassification
from opt_flax.pretrained import params_to_canonical
from opt_flax.sharding import DATA, checked_mesh, like_params, shard_params

TrainConfig = TrainOptions  # the name `opt-lm train` and older callers use
OPTIMIZER_NAME = "optimizer.msgpack"
MODEL_OF_HEAD = {
    "causal_lm": FlaxOPTForCausalLM,
    "sequence_classification": FlaxOPTForSequenceClassification,
    "question_answering": FlaxOPTForQuestionAnswering,
}
_INPUTS = ("input_ids", "attention_mask", "labels", "start_positions", "end_positions")

__all__ = ["FlaxTrainer", "TrainConfig", "TrainOptions", "build_optimizer", "tokenizer_files", "train"]


def train(options: TrainOptions | None = None, **flags: Any) -> dict:
    """Runs a training (`opt-lm train`); returns the last evaluation ({"step", "eval_loss", ...metrics}).

    Args:
        options: the run's options; or else
        **flags: `TrainOptions`' fields by name (the flags' names), e.g. `train(train_files=[...], output=...)`.
    """
    options = options if options is not None else TrainOptions(**flags)
    return train_with(options, build_model, lambda model: FlaxTrainer(model, options))


def build_model(options: TrainOptions, tokenizer, config_updates: Mapping[str, Any]):
    """The model of the task's head: the checkpoint's when resuming, init_from's, or a fresh one."""
    cls = MODEL_OF_HEAD[options.head]
    dtype = jnp.bfloat16 if options.dtype == "bfloat16" else jnp.float32
    if options.resume or options.init_from:
        # A LoRA checkpoint holds the adapter only: the base is init_from's again, the adapter restored on top.
        source = options.output if options.resume and options.lora_r is None else options.init_from
        model = cls.from_pretrained(source, dtype=dtype, param_dtype=jnp.float32, seed=options.seed, **config_updates)
    else:
        model = cls(fresh_config(options, tokenizer, config_updates), dtype=dtype, seed=options.seed)
    check_length(options, model.config)
    return model


def build_optimizer(options: TrainOptions, mask: Any = None) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW; `opt_state.hyperparams["learning_rate"]` is set before each update.

    Args:
        options: the run's options.
        mask: a params pytree of bools (`opt_flax.lora.trainable_mask`): only the True leaves are clipped and
            updated, the others get zero updates and no state. None: every leaf trains.
    """
    labels = None if mask is None else jax.tree.map(lambda trained: "train" if trained else "freeze", mask)

    def make(learning_rate):
        update = optax.chain(
            optax.clip_by_global_norm(options.clip_norm) if options.clip_norm else optax.identity(),
            optax.adamw(
                learning_rate,
                b1=options.adam_beta1,
                b2=options.adam_beta2,
                eps=options.adam_epsilon,
                weight_decay=options.weight_decay,
                mask=decay_mask,
            ),
        )
        if labels is None:
            return update
        return optax.multi_transform({"train": update, "freeze": optax.set_to_zero()}, labels)

    return optax.inject_hyperparams(make)(learning_rate=0.0)


def decay_mask(params: Mapping) -> Any:
    """True where AdamW decays: `decays` of each leaf's canonical name (Flax's `kernel`, `embedding` and `scale`
    are torch's `weight`). An adapter's LoRA kernels decay (`...q_proj.lora_A.weight`, as HF Trainer decays them),
    a modules_to_save copy as what it copies, a trained bias not; its scaling and dropout leaves are frozen."""
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias", "trained_bias": "bias"}

    def rule(path, _) -> bool:
        keys = [str(getattr(entry, "key", entry)) for entry in path if getattr(entry, "key", entry) != COPY]
        return keys[-1] in leaf and decays(".".join([*keys[:-1], leaf[keys[-1]]]))

    return jax.tree_util.tree_map_with_path(rule, params)


# ----- losses: (sum of the loss terms, their count), so micro-batches add up to the whole step's mean


def _log_probs(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def causal_lm_losses(out, batch, config) -> tuple[jax.Array, jax.Array]:
    """Per row: summed next-token cross-entropy over labels != -100 (HF's shift), and the count of terms."""
    labels = batch["labels"][:, 1:]  # B T-1
    valid = labels != -100
    picked = jnp.take_along_axis(_log_probs(out.logits[:, :-1]), jnp.where(valid, labels, 0)[..., None], -1)
    return -(picked[..., 0] * valid).sum(-1), valid.sum(-1)


def classification_losses(out, batch, config) -> tuple[jax.Array, jax.Array]:
    """Per row: HF's loss of the problem type (`opt_core.heads.problem_type`): cross-entropy of the label, the
    squared error of a regression, or the mean binary cross-entropy over the labels of a multi-label row."""
    labels, logits = batch["labels"], out.logits.astype(jnp.float32)
    kind = problem_type(config, logits.shape[-1], jnp.issubdtype(labels.dtype, jnp.integer))
    if kind == "regression":
        losses = ((logits.reshape(labels.shape) - labels.astype(jnp.float32)) ** 2).reshape(len(logits), -1).mean(-1)
    elif kind == "single_label_classification":
        losses = -jnp.take_along_axis(_log_probs(logits), labels.astype(jnp.int32)[:, None], -1)[:, 0]
    else:
        losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
    return losses, jnp.ones_like(losses)


def question_answering_losses(out, batch, config) -> tuple[jax.Array, jax.Array]:
    """Per row: the mean of the start and end positions' cross-entropies (positions past the row are ignored,
    as HF's clamp to an ignored index); no terms where the batch has no positions (QA's eval rows)."""
    if "start_positions" not in batch:
        zeros = jnp.zeros(out.start_logits.shape[0], jnp.float32)
        return zeros, zeros
    length = out.start_logits.shape[-1]
    losses, counts = 0.0, 0.0
    for logits, positions in ((out.start_logits, batch["start_positions"]), (out.end_logits, batch["end_positions"])):
        valid = (positions >= 0) & (positions < length)
        picked = jnp.take_along_axis(_log_probs(logits), jnp.clip(positions, 0, length - 1)[:, None], -1)[:, 0]
        losses, counts = losses - 0.5 * picked * valid, counts + 0.5 * valid
    return losses, counts


LOSSES = {
    "causal_lm": causal_lm_losses,
    "sequence_classification": classification_losses,
    "question_answering": question_answering_losses,
}


# ----- the trainer


class FlaxTrainer:
    """`opt_core.training.Trainer` in Flax: the model's params and the optax state, with jit'd steps. A step
    donates the params and state it is given (XLA reuses their buffers), so arrays taken from `model.params` before
    a step are gone after it; `model.params` always holds the current ones.

    Args:
        model: a Flax OPT model with a task head.
        options: the run's options.
    """

    optimizer_file = OPTIMIZER_NAME

    def __init__(self, model, options: TrainOptions):
        self.model, self.options = model, options
        self.mesh = training_mesh(options, model.config)
        self.mask = _trained_mask(model)
        self.optimizer = build_optimizer(options, self.mask)
        self.params = self._placed_params(model.params)
        self.model.params = self.params  # no second, unplaced copy
        self.shardings = None if self.mesh is None else step_shardings(self.mesh, self.optimizer, self.params)
        if self.shardings is None:
            self.opt_state = self.optimizer.init(self.params)
        else:  # each moment made on its param's shards
            self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.shardings.opt_state)(self.params)
        self.key = jax.random.PRNGKey(options.seed)
        self.dropout = options.dropout and _has_dropout(model)
        steps = _make_steps(model, self.optimizer, self.dropout, self.mask)
        self._train_step, self._eval_step = _jit_steps(*steps, self.shardings)

    def train_step(self, batch: Mapping[str, np.ndarray], learning_rate: float, step: int) -> float:
        inputs = _inputs(batch, self.shardings and self.shardings.step_batch)
        key = jax.random.fold_in(self.key, step)
        self.params, self.opt_state, loss = self._train_step(
            self.params, self.opt_state, inputs, jnp.float32(learning_rate), key
        )
        self.model.params = self.params  # the model follows (e.g. `save_adapter` after training)
        return float(loss)

    def eval_outputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = _inputs(batch, self.shardings and self.shardings.eval_batch)
        return {k: np.asarray(v) for k, v in self._eval_step(self.params, inputs).items()}

    def _placed_params(self, params) -> Any:
        """`params` on the mesh by the partition rules (a LoRA adapter's leaves as their kernels'), or as given."""
        return params if self.mesh is None else shard_params(params, self.mesh, self.model.config, self.model.head)

    def optimizer_state(self) -> bytes:
        return optimizer_bytes(self.opt_state, self.params, self.options.save_dtype)

    def save(self, folder: Path, extra_files: Mapping[str, bytes]) -> None:
        if self.model.active_adapter is None:
            save_model(folder, self.model, self.params, self.options.save_dtype, extra_files)
            return
        self.model.params = self.params
        plan, tensors = self.model.adapter_arrays()
        write_adapter(folder, plan, tensors, extra_files=extra_files)

    def restore(self, folder: Path, optimizer_state: bytes) -> None:
        if self.model.active_adapter is None:
            params = MODEL_OF_HEAD[self.model.head].from_pretrained(folder, param_dtype=jnp.float32).params
        else:
            params = _with_adapter_checkpoint(self.params, folder, self.model)
        params, opt_state = restore_optimizer(optimizer_state, params, self.opt_state, self.options)
        self.params = self._placed_params(params)
        self.opt_state = opt_state if self.mesh is None else jax.device_put(opt_state, self.shardings.opt_state)
        self.model.params = self.params


# ----- the device mesh


class StepShardings(NamedTuple):
    """Where a mesh run keeps each argument of its steps."""

    params: Any  # the params pytree of NamedShardings: the partition rules (opt_flax.sharding)
    opt_state: Any  # the optax state's: each moment as its param, counts and hyperparams replicated
    step_batch: NamedSharding  # a step's [A, B, ...] arrays: the B rows of each micro-batch split over "data"
    eval_batch: NamedSharding  # an eval batch's [B, ...] arrays: split over "data"
    replicated: NamedSharding  # the rate, the dropout key, the loss


def training_mesh(options: TrainOptions, config) -> Mesh | None:
    """The checked mesh of `options.mesh` (None without one); its data axis must divide the batch's rows."""
    if options.mesh is None:
        return None
    sizes = parse_mesh(options.mesh)
    if options.batch_size % sizes[DATA]:
        raise ConfigError(
            f"batch_size {options.batch_size} must be a multiple of the mesh's data axis ({sizes[DATA]}): "
            "each data shard takes an equal share of every micro-batch"
        )
    return checked_mesh(sizes, config)


def step_shardings(mesh: Mesh, optimizer: optax.GradientTransformation, params) -> StepShardings:
    """The shardings of a run on `mesh` whose params are already placed there (`shard_params`)."""
    params_shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
    state_shapes = jax.eval_shape(optimizer.init, params)
    return StepShardings(
        params=params_shardings,
        opt_state=like_params(state_shapes, params, mesh),
        step_batch=NamedSharding(mesh, PartitionSpec(None, DATA)),
        eval_batch=NamedSharding(mesh, PartitionSpec(DATA)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def _inputs(batch: Mapping[str, np.ndarray], sharding: NamedSharding | None) -> dict[str, jax.Array]:
    """The model's inputs of `batch`, put straight onto their shards (one device's default without a mesh)."""
    return {k: jax.device_put(v, sharding) for k, v in batch.items() if k in _INPUTS}


def _jit_steps(train_step, eval_step, shardings: StepShardings | None):
    """The jitted steps; on a mesh with their in and out shardings. The params and optimizer state are donated:
    the step writes its results into their buffers instead of holding a second copy of both (with an adapter,
    the frozen base's leaves pass through in place)."""
    if shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)
    s = shardings
    train = jax.jit(
        train_step,
        donate_argnums=(0, 1),
        in_shardings=(s.params, s.opt_state, s.step_batch, s.replicated, s.replicated),
        out_shardings=(s.params, s.opt_state, s.replicated),
    )
    return train, jax.jit(eval_step, in_shardings=(s.params, s.eval_batch))


def _trained_mask(model) -> Any:
    """The optimizer's mask: None (everything trains) without an adapter, else the model's trainable_mask."""
    if model.active_adapter is None:
        return None
    mask = model.trainable_mask()
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("nothing to train: every parameter is frozen (an adapter loaded with is_trainable=False?)")
    return mask


def _with_adapter_checkpoint(params, folder: Path, model) -> dict:
    """`params` with the active adapter's leaves read back from the adapter folder a LoRA run saved."""
    plan, tensors = load_adapter_tensors(folder, model.config, model.head)
    flat = flatten_dict(params, sep="/")
    flat.update({key: jnp.asarray(value) for key, value in to_leaves(plan, tensors, model.config, flat).items()})
    return unflatten_dict(flat, sep="/")


def _has_dropout(model) -> bool:
    """Whether training draws dropout: the config's, or the active adapter's lora_dropout."""
    names = ("dropout", "attention_dropout", "activation_dropout")
    lora = model.peft_config.get(model.active_adapter) if model.active_adapter is not None else None
    return any(getattr(model.config, name, 0.0) > 0 for name in names) or bool(lora and lora.lora_dropout > 0)


def _make_steps(model, optimizer: optax.GradientTransformation, dropout: bool, mask: Any = None):
    loss_terms, output_names = LOSSES[model.head], EVAL_OUTPUTS[model.head]

    def sums(params, batch, key):
        if mask is not None:  # frozen leaves: no gradient computed (their updates are zero anyway)
            params = jax.tree.map(lambda p, trained: p if trained else jax.lax.stop_gradient(p), params, mask)
        out = model(batch["input_ids"], batch.get("attention_mask"), params=params, train=dropout, dropout_rng=key)
        losses, counts = loss_terms(out, batch, model.config)
        return losses.sum(), counts.sum().astype(jnp.float32)

    def train_step(params, opt_state, batch, learning_rate, key):
        accumulation = jax.tree.leaves(batch)[0].shape[0]

        def micro_step(carry, xs):
            grads, total, count = carry
            micro_batch, index = xs
            rng = jax.random.fold_in(key, index) if dropout else None
            (loss_sum, loss_count), micro_grads = jax.value_and_grad(sums, has_aux=True)(params, micro_batch, rng)
            return (jax.tree.map(jnp.add, grads, micro_grads), total + loss_sum, count + loss_count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        carry = (zeros, jnp.float32(0), jnp.float32(0))
        (grads, total, count), _ = jax.lax.scan(micro_step, carry, (batch, jnp.arange(accumulation)))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # the gradient of the whole step's mean loss
        opt_state.hyperparams["learning_rate"] = learning_rate
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total / count

    def eval_step(params, batch):
        out = model(batch["input_ids"], batch.get("attention_mask"), params=params)
        losses, counts = loss_terms(out, batch, model.config)
        outputs = {name: getattr(out, name).astype(jnp.float32) for name in output_names}
        return {"loss_sum": losses, "loss_count": counts.astype(jnp.float32), **outputs}

    return train_step, eval_step


# ----- checkpoints (the commit is `opt_core.pretrained.save_pretrained`'s; the state is `opt_core.training`'s)


def optimizer_bytes(opt_state, params, save_dtype: str) -> bytes:
    """The optax state, and the float32 params when the saved weights are rounded (so that resuming is exact)."""
    master = params if save_dtype != "float32" else None
    return flax.serialization.to_bytes({"opt_state": opt_state, "master": master})


def restore_optimizer(data: bytes, params, opt_state_template, options: TrainOptions) -> tuple[Any, Any]:
    """(params, opt_state) from `optimizer_bytes`: the saved float32 params if any, else `params`."""
    lossy = options.save_dtype != "float32"
    template = {"opt_state": opt_state_template, "master": params if lossy else None}
    state = flax.serialization.from_bytes(template, data)
    return (state["master"] if lossy else params), state["opt_state"]


def save_model(folder: Path, model, params, save_dtype: str, extra_files: Mapping[str, bytes]) -> None:
    """The model in HF's layout (config with its head, generation config) and `extra_files`, in one commit."""
    save_folder(
        folder,
        params_to_canonical(params, model.config, model.head),
        model.config,
        model.head,
        architecture=ARCHITECTURE_OF_HEAD[model.head],
        generation_config=GenerationConfig.from_model_config(model.config),
        fmt="safetensors",
        dtype=save_dtype,
        extra_files=extra_files,
    )


def save_state(cfg: TrainOptions, model, params, opt_state, step: int, tokenizer: Mapping[str, bytes] | None = None):
    """A checkpoint of `step` without a run (numpy pytrees are enough, so a forked process can save)."""
    state = TrainingState(step, cfg.to_json(), log_offset=0)
    files = checkpoint_files(state, OPTIMIZER_NAME, optimizer_bytes(opt_state, params, cfg.save_dtype))
    save_model(cfg.output, model, params, cfg.save_dtype, {**files, **(tokenizer or {})})


def restore_state(cfg: TrainOptions, params, opt_state) -> tuple[Any, Any, int]:
    """(params, opt_state, step) of `cfg.output`'s checkpoint, `params` and `opt_state` giving the structure."""
    state, data = read_checkpoint(cfg.output, OPTIMIZER_NAME)
    params = MODEL_OF_HEAD[cfg.head].from_pretrained(cfg.output).params
    params, opt_state = restore_optimizer(data, params, opt_state, cfg)
    return params, opt_state, state.step
