"""`from_pretrained` / `save_pretrained` for the Keras models: the glue between `opt_core` and Keras 3.

Siblings: `opt_torch/pretrained.py`, `opt_flax/pretrained.py`; the framework-free halves (folders, hub, config,
checkpoint formats, a fresh task head's init, dtype rules) are `opt_core.pretrained` and `opt_core.dtypes`. Layer
attribute names equal the canonical module names of `opt_core.weights`, so a canonical name walks the attribute path
to its layer (`module_path`: a bare `TFOPTModel` drops the leading `model.`, as the torch one does) and the Keras
leaf rule (`LEAF_RULES["keras"]`: kernel, bias, embeddings, gamma, beta) names the variable; kernels are [in, out],
the transpose of the canonical layout. Keras' own layer and variable names never matter for loading.

LoRA adapters in PEFT's format (`add_adapter`, `load_adapter`, `save_adapter`, ...) come from `opt_tf.lora.LoraMixin`;
their variables sit beside the base ones and never enter `canonical_state` or a weights file.

Loading builds the model with its kernels and embeddings allocated unwritten (`Unfilled`: a random draw or a zero
fill would be overwritten at once) and assigns every variable once from the memory-mapped checkpoint arrays, in
float32 by default whatever the file stores, a block of rows at a time with the file's pages released behind each
block: peak memory is the variables and one block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core import pretrained as core_pretrained  # noqa: E402
from opt_core.config import OPTConfig  # noqa: E402
from opt_core.dtypes import resolve_dtype  # noqa: E402
from opt_core.lazy import LazyTensor, copy_released, row_blocks  # noqa: E402
from opt_core.weights import LEAF_RULES, kind_of, module_path, parameter_specs, to_style_layout  # noqa: E402
from opt_tf.cache import KVCache  # noqa: E402
from opt_tf.lora import LoraMixin  # noqa: E402

# Keras dtype policies a model may compute in; "mixed_*" keep float32 variables.
POLICIES = ("float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")


def hf_initializer(config: OPTConfig) -> keras.initializers.Initializer:
    """HF's init for kernels and embeddings: normal(init_std)."""
    return keras.initializers.RandomNormal(stddev=config.init_std)


class Unfilled(keras.initializers.Initializer):
    """For kernels and embeddings that `from_pretrained` assigns at once: their memory is allocated unwritten
    (`tf.raw_ops.Empty(init=False)`), so its pages are first touched by the checkpoint's values, a block at a
    time. A zero fill touched every page first: loading then held the zeroed model before any value arrived.
    Never for a variable that is not assigned next: its values would be whatever the memory held."""

    def __call__(self, shape, dtype=None):
        return tf.raw_ops.Empty(shape=shape, dtype=tf.as_dtype(dtype or "float32"), init=False)


class PreTrainedOPT(LoraMixin, keras.Model):
    """Shared by every Keras OPT class: building, loading, saving, Keras config, `fit`'s loss and LoRA adapters.

    Subclasses set `head` ("base", "causal_lm", "sequence_classification" or "question_answering") and
    `hf_loss(outputs, labels)`, and build their layers with `self.initializer`.

    Args:
        config: the model's OPTConfig.
        initializer: for kernels and embeddings; HF's normal(init_std) by default (`from_pretrained` passes
            `Unfilled`, as it assigns every one of them from the checkpoint).
        **kwargs: Keras model arguments: `name`, and `dtype` (a policy such as "mixed_bfloat16").
    """

    head = "base"

    def __init__(self, config: OPTConfig, initializer: keras.initializers.Initializer | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.initializer = initializer or hf_initializer(config)
        # `generate` passes its [out, in] kernels down to the dense layers (opt_tf.decode_layout).
        self._register_call_context_args("decode_layout")

    def __call__(self, input_ids=None, *args, **kwargs):
        if isinstance(input_ids, Mapping):  # fit / evaluate / predict pass a dataset's dict of inputs as one value
            kwargs = {**input_ids, **kwargs}
            input_ids = kwargs.pop("input_ids", None)
        return super().__call__(input_ids, *args, **kwargs)

    def get_input_embeddings(self) -> keras.layers.Embedding:
        decoder = self.decoder if hasattr(self, "decoder") else self.model.decoder
        return decoder.embed_tokens

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty static cache (`opt_tf.cache.KVCache`) of max_length slots, in the compute dtype."""
        return KVCache.create(self.config, batch_size, max_length, self.dtype_policy.compute_dtype)

    def num_parameters(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.weights)

    # ----- Keras serialisation (`from_config`, `.keras` files)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        config = dict(config)
        opt_config = OPTConfig.from_dict(config.pop("config"))
        return cls(opt_config, **config)

    # ----- fit, evaluate, predict

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # As HF's TF models: compile() needs no loss; labels come from `labels` in x, from y, or (causal LM)
        # from the input ids themselves, padding ignored. sample_weight is not supported.
        loss = y_pred.loss
        if loss is None:
            if y is None and self.head == "causal_lm":
                y = _labels_from_inputs(x)
            if y is None:
                raise ValueError(f"{type(self).__name__}.fit needs labels: pass (inputs, labels) or inputs['labels']")
            loss = self.hf_loss(y_pred, y)
        if self.losses:
            loss = loss + tf.add_n(self.losses)
        # Under tf.distribute each replica's loss is divided by the replica count, as Keras' own losses are: the
        # optimizer sums the replicas' gradients and Keras' loss metric multiplies the count back.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return loss / replicas if replicas > 1 else loss

    def predict_step(self, data):
        # Keras' predict concatenates a dict of batch-first tensors; caches are left out.
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        out = self(x, training=False, use_cache=False)
        return {name: out[name] for name in out}

    # ----- canonical names

    def keras_layer(self, module: str) -> keras.layers.Layer:
        """The layer of a canonical module (`model.decoder.layers.0.fc1`): its module path as attributes."""
        layer = self
        for part in module_path(module, self.head).split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        return layer

    def keras_variable(self, canonical: str, kind: str) -> keras.Variable:
        """The variable of a canonical parameter: its module's layer, then the Keras leaf name."""
        return getattr(self.keras_layer(canonical.rsplit(".", 1)[0]), LEAF_RULES["keras"].leaves[kind])

    def canonical_state(self, lazy: bool = False) -> dict[str, np.ndarray | LazyTensor]:
        """{canonical name: numpy array in torch layout} of every parameter (a tied head once).

        Args:
            lazy: give `LazyTensor`s that read their variable only when a writer asks, so saving holds one
                tensor at a time rather than a second copy of the model.
        """
        state = {}
        for spec in parameter_specs(self.config, self.head):
            variable = self.keras_variable(spec.name, spec.kind)
            read = lambda v=variable, kind=spec.kind: to_style_layout(v.numpy(), kind, "keras")  # noqa: E731
            dtype = tf.as_dtype(variable.dtype).as_numpy_dtype
            state[spec.name] = LazyTensor(spec.shape, dtype, read, spec.name) if lazy else read()
        return state

    # ----- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: Any = None,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = "default",
        **kwargs: Any,
    ):
        """Loads a model from a local folder, the HF cache, or the hub, from any format opt_core reads.

        Args:
            name_or_path: a folder written by `save_pretrained` (in any framework, or by HF), or a hub id.
            dtype: float32 by default, whatever the checkpoint stores; "auto" keeps the stored dtype; "float16",
                "bfloat16", or a mixed policy ("mixed_bfloat16": float32 variables, bfloat16 compute).
            adapter: a PEFT LoRA adapter (folder or hub id) to load after the base (`load_adapter`), with the
                base's `token` and `local_files_only`.
            adapter_name: its name.
            **kwargs: the loading options every framework shares (`opt_core.pretrained.load_pretrained`): `config`
                (instead of the folder's config.json), `fmt` (the format to read when the folder holds several),
                `revision`, `cache_dir`, `local_files_only`, `token` (huggingface_hub, for hub ids), and config
                fields to override as HF does (e.g. `num_labels=3`).
        """
        # keras.utils.set_random_seed controls a fresh head's init; the seed is drawn only when a head is missing.
        seed = lambda: int(np.random.randint(2**31 - 1))  # noqa: E731
        loaded = core_pretrained.load_pretrained(name_or_path, cls.head, seed=seed, **kwargs)
        dtype = resolve_dtype(dtype, loaded.stored_dtype, allowed=POLICIES)
        model = cls(loaded.config, initializer=Unfilled(), dtype=dtype)
        model._assign(loaded.tensors)
        if hasattr(model, "generate"):
            model.generation_config = loaded.generation_config
        if adapter is not None:
            hub = {k: kwargs[k] for k in ("token", "local_files_only") if k in kwargs}
            model.load_adapter(adapter, adapter_name, **hub)
        return model

    def _assign(self, tensors: Mapping[str, np.ndarray]) -> None:
        for name, array in tensors.items():
            kind = kind_of(name)
            variable = self.keras_variable(name, kind)
            _assign_in_blocks(variable.value, array, transpose=to_style_layout(array, kind, "keras") is not array)

    # ----- saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool | None = None,
        fmt: str | None = None,
        max_shard_size: int | str = "5GB",
        dtype: Any = None,
    ) -> list[Path]:
        """Writes config.json, generation_config.json and the weights as HF does; every framework's
        `from_pretrained` reads the folder. Returns the weight files.

        Args:
            save_directory: the folder; created if needed.
            safe_serialization: True writes safetensors; False or None tf_model.h5 (HF's Keras-2 layout), the
                default of HF's TF port.
            fmt: any format by name ("safetensors", "pytorch", "tf", "flax"); wins when given.
            max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
            dtype: cast the weights to this dtype on the way out, one tensor at a time (default: as the variables;
                h5 stores bfloat16 as float32).
        """
        return core_pretrained.save_pretrained(
            save_directory,
            self.canonical_state(lazy=True),
            self.config,
            self.head,
            # As HF's TF port: the architecture is named without the "TF" prefix, so every framework reads it.
            architecture=type(self).__name__.removeprefix("TF"),
            generation_config=getattr(self, "generation_config", None),
            fmt=core_pretrained.save_format(safe_serialization, fmt, native="tf", safe_by_default=False),
            max_shard_size=max_shard_size,
            dtype=dtype,
        )


def _assign_in_blocks(variable: tf.Variable, array: np.ndarray, transpose: bool) -> None:
    """Writes a canonical array into a variable (transposed: the Keras leaf rule's [in, out] kernels) a block of
    rows at a time, in place, each block's pages of the memory-mapped file released behind it
    (`opt_core.lazy.row_blocks`): loading holds the variables and one block.

    Through the raw op: `variable[rows].assign(...)` returns a read of the variable that shares its buffer, so the
    next block's write copied the whole variable first (measured: 2x a 128 MB variable after two blocks); a
    whole-tensor `assign` briefly held three copies of the tensor.
    """
    dtype = variable.dtype.as_numpy_dtype
    axis = 1 if transpose else 0
    # Under tf.distribute (a model made in a MirroredStrategy's scope) each device's copy is written: the mirrored
    # variable itself has no handle outside a replica context.
    copies = variable.values if isinstance(variable, tf.distribute.DistributedValues) else (variable,)
    for rows, block in row_blocks(array):
        begin, end = [0] * variable.shape.rank, list(variable.shape)
        if block.ndim:  # a 0-d array is one block, written whole
            begin[axis], end[axis] = rows.start or 0, (rows.start or 0) + block.shape[0]
        value = copy_released(block, dtype, transpose=transpose)
        for copy in copies:
            tf.raw_ops.ResourceStridedSliceAssign(
                ref=copy.handle, begin=begin, end=end, strides=[1] * len(begin), value=value
            )


def _labels_from_inputs(x) -> tf.Tensor:
    """Causal-LM labels from the inputs themselves: the token ids, with padding (mask 0) ignored as -100."""
    if isinstance(x, Mapping):
        input_ids, mask = x["input_ids"], x.get("attention_mask")
    else:
        input_ids, mask = x, None
    labels = tf.cast(input_ids, tf.int32)
    if mask is None:
        return labels
    return tf.where(tf.cast(mask, tf.bool), labels, -100)
