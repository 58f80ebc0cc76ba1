"""Training and fine-tuning in Keras 3: the Keras step of `opt_core.training` (`opt-lm train`).

Everything but the step is framework-free and lives in `opt_core.training`: options, HF's warmup + linear/cosine
schedule, the weight-decay rule, data, the log and progress bar, checkpoints and resume. Here, Keras' own
machinery: `model.compile(optimizer=keras.optimizers.AdamW(...))` with the model's own loss (`PreTrainedOPT.
compute_loss`: the heads compute HF's losses from `labels` / `start_positions` / `end_positions` in the inputs),
global-norm clipping (`global_clipnorm`), no decay where `opt_core.training.decays` says so
(`exclude_from_weight_decay`), Keras' `gradient_accumulation_steps`, and a `mixed_bfloat16` dtype policy for bf16.

Each protocol step runs `model.train_on_batch` once per micro-batch: that is `fit`'s compiled step for one batch.
`fit` itself is not used because the shared loop owns batching, evaluation and checkpoints, so that all three
frameworks see the same batches in the same order and save the same checkpoints. The rate of each step is assigned
to `optimizer.learning_rate` (a variable the compiled step reads) before it runs.

Two things Keras' AdamW would do differently from HF's (torch's) are corrected in `DenseAdamW`: epsilon is added
where torch adds it (Keras adds it before v's bias correction: 31.6x torch's effective epsilon at the first update;
it put the losses 1-2e-5 apart over 50 tiny steps, 1e-4 over 30 LoRA steps and 3e-3 on opt-125m), and embedding
gradients are summed before the update (Keras' sparse path mis-counts repeated lookups). With both, the worst
per-step loss difference from HF + torch AdamW over 50 steps is 2.7-6.7e-6 (tests/test_train_tf.py). Left as
Keras does it: clipping by `clip / max(norm, clip)` where torch's `clip_grad_norm_` uses `clip / (norm + 1e-6)`.
HF's `padding_idx` (the pad token's lookups give its row no gradient) is the model's own (`opt_tf.modeling`).

Keras' accumulation averages the micro-batches' mean losses; the protocol's mean over all loss terms of the step is
the same when every micro-batch has as many terms, which `opt_core.data`'s rows always do (full causal-LM blocks,
one label per classification row, QA positions always inside the window); `train_step` checks it.

LoRA (a model with an active adapter, `opt_tf.lora`): `add_adapter` freezes the base variables, so
`model.trainable_variables`, which the compiled step differentiates and the optimizer is built over, are the
adapter's LoRA tensors, modules_to_save copies and trained biases, keyed in the optimizer state by their canonical
adapter names (`opt_core.adapters`); a checkpoint is then PEFT's adapter folder (beside the trainer's files) and
resuming rebuilds the base from `init_from` and reads the adapter back. An adapter's lora_dropout is a Keras
`Dropout` like the model's, seeded per step the same way.

Data parallel under `tf.distribute` (`options.mesh` "data=N": a `MirroredStrategy` over N devices, the GPUs, or
the logical CPUs where there are none; or, without a mesh, the strategy whose scope `train` is called in): the
model, optimizer and metrics are made in the strategy's scope, each micro-batch's rows are split among the
replicas (`experimental_distribute_values_from_function`) and run by Keras' train function. Two things make that
one device's update: the model's loss is divided by the replica count, as Keras' own losses are (`compute_loss`),
and `DenseAdamW` sums the replicas' gradients before it clips them (Keras' TF optimizer clips each replica's
gradient, then sums: not the global norm). Each replica's share of a micro-batch must hold as many loss terms
(the mean of the replicas' means is then the micro-batch's mean), which `train_step` checks. Keras on TensorFlow
has no model (tensor) parallelism: a "model" axis is refused. XLA is off under several replicas (`TFTrainer`).

Siblings: `opt_torch/train.py`, `opt_flax/train.py`. Entry point: `train(options)` or `train(**options)`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core import pretrained as core_pretrained  # noqa: E402
from opt_core.adapters import from_file_tensors, read_adapter, write_adapter  # noqa: E402
from opt_core.errors import ConfigError  # noqa: E402
from opt_core.generation import GenerationConfig  # noqa: E402
from opt_core.heads import problem_type  # noqa: E402
from opt_core.safetensors_file import read_safetensors, write_safetensors  # noqa: E402
from opt_core.training import (  # noqa: E402
    ARCHITECTURE_OF_HEAD,
    EVAL_OUTPUTS,
    TrainOptions,
    check_length,
    decays,
    fresh_config,
    parse_mesh,
    train_with,
)
from opt_core.weights import parameter_specs  # noqa: E402
from opt_tf.modeling import TFOPTForCausalLM, TFOPTForQuestionAnswering, TFOPTForSequenceClassification  # noqa: E402

TrainConfig = TrainOptions  # the name `opt-lm train` uses, as in opt_flax.train
OPTIMIZER_NAME = "optimizer.safetensors"
MODEL_OF_HEAD = {
    "causal_lm": TFOPTForCausalLM,
    "sequence_classification": TFOPTForSequenceClassification,
    "question_answering": TFOPTForQuestionAnswering,
}
_INPUTS = ("input_ids", "attention_mask", "labels", "start_positions", "end_positions")
# XLA for the compiled steps, measured fastest once compiled: on 2 CPU cores, tests/conftest.py's tiny model,
# batch 4 x 32 tokens, 10.5 ms a step with jit_compile=True against 16.6 ms without; compiling costs ~6 s more.
JIT_COMPILE = True

__all__ = ["TFTrainer", "TrainConfig", "TrainOptions", "build_optimizer", "train"]


def train(options: TrainOptions | None = None, **flags: Any) -> dict:
    """Runs a training (`opt-lm train`); returns the last evaluation ({"step", "eval_loss", ...metrics}). The log
    is `output/training_log.jsonl`.

    Args:
        options: the run's options; or else
        **flags: `TrainOptions`' fields by name (the flags' names), e.g. `train(train_files=[...], output=...)`.
    """
    options = options if options is not None else TrainOptions(**flags)
    with distribution_strategy(options).scope():  # the model and the optimizer are made in it
        return train_with(options, build_model, lambda model: TFTrainer(model, options))


def distribution_strategy(options: TrainOptions) -> tf.distribute.Strategy:
    """`options.mesh`'s strategy: "data=N" mirrors the model over N devices: the GPUs, or on a machine without
    GPUs its CPU split into N logical devices (they share the cores: that tests a set-up, it is not faster).
    Without a mesh, the strategy in scope (TensorFlow's default one outside any).

    Raises:
        ConfigError: for a "model" axis (Keras on TensorFlow has no tensor parallelism), or N not the GPU count,
            or a CPU split asked for after TensorFlow has started with other logical devices.
    """
    if options.mesh is None:
        return tf.distribute.get_strategy()
    replicas = parse_mesh(options.mesh)
    if replicas["model"] > 1:
        raise ConfigError(
            f"mesh {options.mesh!r}: Keras on TensorFlow trains data parallel only (tf.distribute.MirroredStrategy); "
            "a model axis (tensor parallelism) needs --framework flax"
        )
    if replicas["data"] == 1:
        return tf.distribute.get_strategy()
    devices = _logical_devices(replicas["data"], options.mesh)
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def _logical_devices(count: int, mesh: str) -> list:
    """`count` logical devices: all the GPUs, or the CPU split in `count` (before TensorFlow starts)."""
    if tf.config.list_physical_devices("GPU"):  # (listing logical devices would start TensorFlow)
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) != count:
            raise ConfigError(f"mesh {mesh!r} needs {count} devices; TensorFlow has {len(gpus)} GPUs")
        return gpus
    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu) is None:
        with contextlib.suppress(RuntimeError):  # started already: the count below says what there is
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) != count:
        raise ConfigError(
            f"mesh {mesh!r} needs {count} devices; TensorFlow started with {len(cpus)} CPU devices (split the CPU "
            "with tf.config.set_logical_device_configuration before TensorFlow starts, or train in a fresh process)"
        )
    return cpus


def build_model(options: TrainOptions, tokenizer, config_updates: Mapping[str, Any]) -> keras.Model:
    """The model of the task's head: the checkpoint's when resuming, init_from's, or a fresh one (seeded)."""
    cls = MODEL_OF_HEAD[options.head]
    policy = "mixed_bfloat16" if options.dtype == "bfloat16" else "float32"
    keras.utils.set_random_seed(options.seed)  # a fresh model's init, or a fresh task head's
    if options.resume or options.init_from:
        # A LoRA checkpoint holds the adapter only: the base is init_from's again, the adapter restored on top.
        source = options.output if options.resume and options.lora_r is None else options.init_from
        model = cls.from_pretrained(source, dtype=policy, **config_updates)
    else:
        model = cls(fresh_config(options, tokenizer, config_updates), dtype=policy)
    check_length(options, model.config)
    return model


class DenseAdamW(keras.optimizers.AdamW):
    """Keras' AdamW, given dense gradients.

    An embedding lookup's gradient is a `tf.IndexedSlices` with one slice per looked-up token, duplicates
    included, and Keras' TF optimizer scatters each slice's moment update on its own: a row looked up k times gets
    sum(g_i**2) in its second moment instead of (sum g_i)**2, and rows not looked up keep stale moments (lazy
    Adam). Measured: position rows a whole learning rate off torch's AdamW after one step. Summing the slices
    first gives torch's dense update (and HF's).

    Args:
        **kwargs: `keras.optimizers.AdamW`'s.
    """

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(_summed_over_replicas(grads), trainable_variables)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Keras' TF optimizer sums the replicas' gradients here, after clipping each replica's: `apply` has
        # summed them already, so that clipping sees the global norm.
        return grads_and_vars

    def _backend_apply_gradients(self, grads, trainable_variables):
        context = tf.distribute.get_replica_context()
        if not self.gradient_accumulation_steps or context is None or context.num_replicas_in_sync == 1:
            return super()._backend_apply_gradients(grads, trainable_variables)
        # Keras' accumulation puts its merge_calls (weight decay, the update) inside a cond, which a replica
        # context refuses; here one merge_call holds the cond. `grads` are the replicas' sum, equal on every
        # replica, so each replica clips the accumulated gradient by the same global norm.
        steps = self.gradient_accumulation_steps
        accumulators = [self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables]
        clipped = self._clip_gradients([(g + a.value) / steps for g, a in zip(grads, accumulators)])

        def update_or_accumulate(distribution, grads, clipped):
            def update():
                rate = self.learning_rate
                for grad, variable in zip(clipped, trainable_variables):
                    distribution.extended.update(variable.value, self._decay_and_update, (grad, rate), group=False)
                for accumulator in accumulators:
                    distribution.extended.update(accumulator.value, lambda a: a.assign(tf.zeros_like(a)), group=False)

            def accumulate():
                for grad, accumulator in zip(grads, accumulators):
                    distribution.extended.update(accumulator.value, lambda a, g: a.assign_add(g), (grad,), group=False)

            tf.cond((self._iterations + 1) % steps == 0, update, accumulate)

        context.merge_call(update_or_accumulate, args=(grads, clipped))

    def _decay_and_update(self, variable, gradient, learning_rate):
        """One device's copy of `variable`: Keras' decoupled weight decay, then the step (`update_step`)."""
        if self._use_weight_decay(variable):  # Keras' formula, in its order of operations
            decay, rate = tf.cast(self.weight_decay, variable.dtype), tf.cast(learning_rate, variable.dtype)
            variable.assign_sub(variable * decay * rate)
        self.update_step(gradient, variable, learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        """Keras' Adam step with epsilon where torch's AdamW (and HF's) adds it: to the bias-corrected sqrt(v),
        i.e. `epsilon * sqrt(1 - beta_2**t)` beside Keras' uncorrected sqrt(v). Keras adds epsilon to sqrt(v)
        itself, 1 / sqrt(1 - beta_2**t) times more (31.6x at the first step with beta_2 = 0.999): a weight whose
        gradients are near epsilon moves a different share of the rate (measured: opt-125m's fp32 loss 3e-3 away
        from torch's after a few steps, through its 50272 embedding rows, most with tiny gradients)."""
        dtype = variable.dtype
        gradient = keras.ops.cast(gradient, dtype)
        step = keras.ops.cast(self.iterations + 1, dtype)
        beta_1_power = keras.ops.power(keras.ops.cast(self.beta_1, dtype), step)
        beta_2_power = keras.ops.power(keras.ops.cast(self.beta_2, dtype), step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        correction = keras.ops.sqrt(1 - beta_2_power)
        alpha = keras.ops.cast(learning_rate, dtype) * correction / (1 - beta_1_power)
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (keras.ops.square(gradient) - v) * (1 - self.beta_2))
        self.assign_sub(variable, m * alpha / (keras.ops.sqrt(v) + self.epsilon * correction))


def _summed_over_replicas(grads: list) -> list:
    """Each gradient summed over the replicas of the strategy in scope (unchanged on one replica); None kept."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return grads
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, [g for g in grads if g is not None]))
    return [None if g is None else next(summed) for g in grads]


def build_optimizer(options: TrainOptions, model: keras.Model) -> keras.optimizers.AdamW:
    """Keras' AdamW (`DenseAdamW`) with the run's betas, epsilon and decay, clipping by global norm, accumulation over
    `grad_accum` micro-batches, and no decay on the parameters `decays` excludes (biases, LayerNorm weights)."""
    optimizer = DenseAdamW(
        learning_rate=0.0,  # assigned before every step
        weight_decay=options.weight_decay,
        beta_1=options.adam_beta1,
        beta_2=options.adam_beta2,
        epsilon=options.adam_epsilon,
        global_clipnorm=options.clip_norm,
        gradient_accumulation_steps=options.grad_accum if options.grad_accum > 1 else None,
    )
    kept = [variable for name, variable in trained_variables(model).items() if not decays(name)]
    optimizer.exclude_from_weight_decay(var_list=kept)
    return optimizer


def canonical_variables(model: keras.Model) -> dict[str, keras.Variable]:
    """{canonical name: the model's variable} over the parameter table (a tied head once)."""
    specs = parameter_specs(model.config, model.head)
    return {spec.name: model.keras_variable(spec.name, spec.kind) for spec in specs}


def trained_variables(model: keras.Model) -> dict[str, keras.Variable]:
    """{name: variable} of what training updates (`model.trainable_variables`): the trainable base parameters
    under canonical names and the active adapter's under its canonical adapter names (`{module}.lora_A.weight`,
    its modules_to_save copies under the names of the parameters they stand for)."""
    variables = canonical_variables(model)
    if model.active_adapter is not None:
        variables.update(model.adapter_variables())
    trained = {name: variable for name, variable in variables.items() if variable.trainable}
    if not trained:
        raise ConfigError("nothing to train: every parameter is frozen (an adapter loaded with is_trainable=False?)")
    return trained


# ----- per-row losses for evaluation: (sum of the loss terms, their count), as opt_flax.train's


def _cross_entropies(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32))


def causal_lm_losses(out, batch, config) -> tuple[tf.Tensor, tf.Tensor]:
    """Per row: summed next-token cross-entropy over labels != -100 (HF's shift), and the count of terms."""
    labels = tf.cast(batch["labels"][:, 1:], tf.int32)  # B T-1
    valid = tf.cast(labels != -100, tf.float32)
    losses = _cross_entropies(out.logits[:, :-1], tf.where(labels != -100, labels, 0))
    return tf.reduce_sum(losses * valid, -1), tf.reduce_sum(valid, -1)


def classification_losses(out, batch, config) -> tuple[tf.Tensor, tf.Tensor]:
    """Per row: HF's loss of the problem type: cross-entropy, squared error, or mean binary cross-entropy."""
    labels, logits = batch["labels"], tf.cast(out.logits, tf.float32)
    kind = problem_type(config, logits.shape[-1], labels.dtype.is_integer)
    if kind == "regression":
        squares = tf.square(tf.reshape(logits, tf.shape(labels)) - tf.cast(labels, tf.float32))
        losses = tf.reduce_mean(tf.reshape(squares, [tf.shape(logits)[0], -1]), -1)
    elif kind == "single_label_classification":
        losses = _cross_entropies(logits, tf.cast(labels, tf.int32))
    else:
        losses = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(labels, tf.float32), logits), -1)
    return losses, tf.ones_like(losses)


def question_answering_losses(out, batch, config) -> tuple[tf.Tensor, tf.Tensor]:
    """Per row: the mean of the start and end cross-entropies (positions past the row ignored, as HF's clamp);
    no terms where the batch has no positions (QA's eval rows)."""
    if "start_positions" not in batch:
        zeros = tf.zeros(tf.shape(out.start_logits)[:1], tf.float32)
        return zeros, zeros
    length = tf.shape(out.start_logits)[-1]
    losses, counts = 0.0, 0.0
    for logits, positions in ((out.start_logits, batch["start_positions"]), (out.end_logits, batch["end_positions"])):
        positions = tf.cast(positions, tf.int32)
        valid = tf.cast((positions >= 0) & (positions < length), tf.float32)
        terms = _cross_entropies(logits, tf.clip_by_value(positions, 0, length - 1))
        losses, counts = losses + 0.5 * terms * valid, counts + 0.5 * valid
    return losses, counts


LOSSES = {
    "causal_lm": causal_lm_losses,
    "sequence_classification": classification_losses,
    "question_answering": question_answering_losses,
}


def loss_counts(batch: Mapping[str, np.ndarray], head: str) -> np.ndarray:
    """The number of loss terms of each micro-batch of a step's [A, B, ...] arrays (numpy, before it runs)."""
    if head == "causal_lm":
        return (batch["labels"][:, :, 1:] != -100).sum(axis=(1, 2))
    if head == "question_answering":
        length = batch["input_ids"].shape[-1]
        inside = [(p >= 0) & (p < length) for p in (batch["start_positions"], batch["end_positions"])]
        return 0.5 * (inside[0].sum(-1) + inside[1].sum(-1))
    return np.full(batch["labels"].shape[0], batch["labels"].shape[1])


# ----- the trainer


class TFTrainer:
    """`opt_core.training.Trainer` in Keras: the compiled model (Keras AdamW) and a compiled eval step.

    Args:
        model: a Keras OPT model with a task head (`TFOPTForCausalLM`, `TFOPTForSequenceClassification`,
            `TFOPTForQuestionAnswering`), in float32 or the `mixed_bfloat16` policy.
        options: the run's options.
        jit_compile: compile the train and eval steps with XLA; None: `JIT_COMPILE` (XLA, fastest once compiled).
            Off under a strategy of several replicas, as Keras' "auto" decides: Keras compiles `strategy.run`
            whole, and XLA cannot place one program on several devices (measured: "Trying to access resource
            .../replica_1 located in device CPU:1 from device CPU:0").
    """

    optimizer_file = OPTIMIZER_NAME

    def __init__(self, model: keras.Model, options: TrainOptions, jit_compile: bool | None = None):
        self.model, self.options = model, options
        self.strategy = model.distribute_strategy  # the one the model was made under (tf.distribute)
        self.replicas = self.strategy.num_replicas_in_sync
        if options.batch_size % self.replicas:
            raise ConfigError(
                f"batch_size {options.batch_size} must be a multiple of the {self.replicas} replicas of "
                f"{type(self.strategy).__name__}: each takes an equal share of every micro-batch"
            )
        dropouts = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
        self.dropouts = [layer for layer in dropouts if layer.rate > 0] if options.dropout else []
        for layer in dropouts if not options.dropout else ():
            layer.rate = 0.0  # read when the step is traced: no dropout ops at all
        jit_compile = (JIT_COMPILE if jit_compile is None else jit_compile) and self.replicas == 1
        with self.strategy.scope():  # the optimizer's and the metrics' variables mirror the model's
            self.optimizer = build_optimizer(options, model)
            model.compile(optimizer=self.optimizer, jit_compile=jit_compile)  # no loss: the model's own
            self.optimizer.build(model.trainable_variables)
        self._eval_step = _make_eval_step(model, jit_compile)

    def train_step(self, batch: Mapping[str, np.ndarray], learning_rate: float, step: int) -> float:
        self._check_loss_counts(batch, step)
        self.optimizer.learning_rate = learning_rate
        self._seed_dropout(step)
        losses = []
        for index in range(len(batch["input_ids"])):
            inputs = {k: v[index] for k, v in batch.items() if k in _INPUTS}
            losses.append(self._train_on_batch(inputs))
        return float(np.mean(losses))

    def _check_loss_counts(self, batch: Mapping[str, np.ndarray], step: int) -> None:
        """Keras averages the mean losses of the micro-batches (and of the replicas' shares of each): that is the
        step's mean over its loss terms only when they all hold as many."""
        accumulation, rows = batch["input_ids"].shape[:2]
        shares = {
            k: v.reshape(accumulation * self.replicas, rows // self.replicas, *v.shape[2:]) for k, v in batch.items()
        }
        counts = loss_counts(shares, self.model.head)
        if len(set(counts.tolist())) > 1:
            what = "micro-batches" if self.replicas == 1 else f"micro-batches' shares among {self.replicas} replicas"
            raise ConfigError(
                f"step {step}: its {what} have {counts.tolist()} loss terms; Keras' gradient accumulation "
                "averages their mean losses, which is the step's mean only when the counts are equal"
            )

    def _train_on_batch(self, inputs: Mapping[str, np.ndarray]) -> float:
        """Keras' compiled train step on one micro-batch; under a strategy, each replica on its share of the rows."""
        if self.replicas == 1:
            return self.model.train_on_batch(inputs, return_dict=True)["loss"]
        share = len(inputs["input_ids"]) // self.replicas

        def replica_inputs(context: tf.distribute.experimental.ValueContext) -> dict[str, tf.Tensor]:
            begin = context.replica_id_in_sync_group * share  # the replica's device takes it from here
            return {k: tf.constant(v[begin : begin + share]) for k, v in inputs.items()}

        distributed = self.strategy.experimental_distribute_values_from_function(replica_inputs)
        self.model.make_train_function()
        self.model.reset_metrics()
        logs = self.model.train_function([(distributed,)])  # what train_on_batch runs, given per-replica rows
        return float(logs["loss"])

    def _seed_dropout(self, step: int) -> None:
        # Each Dropout's seed state is a function of (seed, layer, step): a resumed run draws the same masks.
        for index, layer in enumerate(self.dropouts):
            state = layer.seed_generator.state
            seed = (self.options.seed * 1009 + index) % 2**31
            state.assign(np.array([seed, step % 2**31], dtype=state.dtype))

    def eval_outputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {k: tf.constant(v) for k, v in batch.items() if k in _INPUTS}
        return {k: v.numpy() for k, v in self._eval_step(inputs).items()}

    def optimizer_state(self) -> bytes:
        return optimizer_bytes(self.model, self.optimizer, self.options.save_dtype)

    def save(self, folder: Path, extra_files: Mapping[str, bytes]) -> None:
        if self.model.active_adapter is not None:  # a LoRA run: PEFT's adapter folder (the base is init_from's)
            plan, tensors = self.model.adapter_arrays()
            write_adapter(folder, plan, tensors, extra_files=extra_files)
        else:
            save_model(folder, self.model, self.options.save_dtype, extra_files)

    def restore(self, folder: Path, optimizer_state: bytes) -> None:
        if self.model.active_adapter is not None:
            _, file_tensors, source = read_adapter(folder)
            self.model.assign_adapter_arrays(from_file_tensors(self.model.adapter_plan(), file_tensors, source))
        else:
            loaded = core_pretrained.load_pretrained(folder, self.model.head, config=self.model.config)
            self.model._assign(loaded.tensors)
        restore_optimizer(optimizer_state, self.model, self.optimizer, self.options.save_dtype)


def _make_eval_step(model: keras.Model, jit_compile: bool):
    loss_terms, output_names = LOSSES[model.head], EVAL_OUTPUTS[model.head]

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def eval_step(batch):
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        losses, counts = loss_terms(out, batch, model.config)
        outputs = {name: tf.cast(getattr(out, name), tf.float32) for name in output_names}
        return {"loss_sum": losses, "loss_count": counts, **outputs}

    return eval_step


# ----- checkpoints (the commit is `opt_core.pretrained.save_pretrained`'s; the state is `opt_core.training`'s)


def optimizer_variables(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> dict[str, keras.Variable]:
    """The optimizer's variables by the name of what they train (`trained_variables`), as torch's AdamW names its
    state: `{name}.exp_avg` (Keras' momentum, the same formula), `{name}.exp_avg_sq` (velocity),
    `{name}.accumulated_gradient` with accumulation, and `iterations` (Keras counts micro-batches when
    accumulating)."""
    variables = {"iterations": optimizer._iterations}
    for name, variable in trained_variables(model).items():
        index = optimizer._get_variable_index(variable)
        variables[f"{name}.exp_avg"] = optimizer._momentums[index]
        variables[f"{name}.exp_avg_sq"] = optimizer._velocities[index]
        if optimizer.gradient_accumulation_steps:
            variables[f"{name}.accumulated_gradient"] = optimizer._accumulated_gradients[index]
    return variables


def optimizer_bytes(model: keras.Model, optimizer: keras.optimizers.Optimizer, save_dtype: str) -> bytes:
    """The optimizer's variables as a safetensors file (numpy only to read back), and the float32 weights it trains
    (Keras layout) under `master.{name}` when the saved weights are rounded (so that resuming is exact)."""
    arrays = {name: np.asarray(variable.numpy()) for name, variable in optimizer_variables(model, optimizer).items()}
    if save_dtype != "float32":
        arrays.update({f"master.{k}": np.asarray(v.numpy()) for k, v in trained_variables(model).items()})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / OPTIMIZER_NAME
        write_safetensors(arrays, path)
        return path.read_bytes()


def restore_optimizer(data: bytes, model: keras.Model, optimizer: keras.optimizers.Optimizer, save_dtype: str) -> None:
    """Assigns `optimizer_bytes`' variables (and master weights) back; every name and shape must match."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / OPTIMIZER_NAME
        path.write_bytes(data)
        arrays = {name: np.array(array) for name, array in read_safetensors(path).items()}
    targets = optimizer_variables(model, optimizer)
    if save_dtype != "float32":
        targets.update({f"master.{k}": v for k, v in trained_variables(model).items()})
    missing, unexpected = sorted(set(targets) - set(arrays)), sorted(set(arrays) - set(targets))
    wrong = sorted(k for k in set(targets) & set(arrays) if tuple(arrays[k].shape) != tuple(targets[k].shape))
    if missing or unexpected or wrong:
        raise ConfigError(
            f"--resume: {OPTIMIZER_NAME} does not match this model and optimizer: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, mis-shaped {wrong[:5]}"
        )
    for name, variable in targets.items():
        variable.assign(arrays[name].astype(variable.dtype))


def save_model(folder: Path, model: keras.Model, save_dtype: str, extra_files: Mapping[str, bytes]) -> None:
    """The model in HF's layout (config with its head, generation config, safetensors) and `extra_files`, in one
    crash-safe commit (the model's `save_pretrained` does the same, without the extra files)."""
    generation_config = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    core_pretrained.save_pretrained(
        folder,
        model.canonical_state(lazy=True),
        model.config,
        model.head,
        architecture=ARCHITECTURE_OF_HEAD[model.head],
        generation_config=generation_config,
        fmt="safetensors",
        dtype=save_dtype,
        extra_files=extra_files,
    )
