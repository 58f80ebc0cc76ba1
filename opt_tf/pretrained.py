"""`from_pretrained` / `save_pretrained` for the Keras models: the glue between `opt_core` and Keras 3.

Siblings: `opt_torch/pretrained.py`, `opt_flax/pretrained.py`. Layer attribute names equal the canonical module
names of `opt_core.weights`, so a canonical name walks the attribute path to its layer and the Keras leaf rule
(`LEAF_RULES["keras"]`: kernel, bias, embeddings, gamma, beta) names the variable; kernels are [in, out], the
transpose of the canonical layout. Keras' own layer and variable names never matter for loading; a bare
`TFOPTModel` drops the leading `model.` as the torch one does.

Loading builds the model with zero initialisers (a random draw would be overwritten at once) and assigns every
variable once from the memory-mapped checkpoint arrays, in float32 by default whatever the file stores.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from opt_core.config import OPTConfig  # noqa: E402
from opt_core.generation import load_generation_config  # noqa: E402
from opt_core.hub import resolve_model  # noqa: E402
from opt_core.lazy import LazyTensor  # noqa: E402
from opt_core.weights import DENSE_BIAS, LEAF_RULES, kind_of, parameter_specs, to_style_layout  # noqa: E402

# Keras dtype policies a model may compute in; "mixed_*" keep float32 variables.
_POLICIES = ("float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
_fresh_init = True


def resolve_dtype(dtype: Any, stored: np.dtype | None) -> str | keras.DTypePolicy:
    """float32 by default whatever the checkpoint stores; "auto" keeps the stored dtype; or a Keras policy."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, keras.DTypePolicy):
        return dtype
    if isinstance(dtype, str) and dtype == "auto":
        return str(stored) if str(stored) in _POLICIES else "float32"
    key = getattr(dtype, "name", str(dtype)).removeprefix("torch.")  # np.dtype, tf.DType, "torch.float16"
    if key not in _POLICIES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto' or one of {', '.join(_POLICIES)}")
    return key


def initializer(config: OPTConfig) -> keras.initializers.Initializer:
    """HF's init for kernels and embeddings, normal(init_std); zeros while `from_pretrained` builds the model."""
    if _fresh_init:
        return keras.initializers.RandomNormal(stddev=config.init_std)
    return keras.initializers.Zeros()


@contextlib.contextmanager
def _without_init():
    global _fresh_init
    _fresh_init = False
    try:
        yield
    finally:
        _fresh_init = True


class PreTrainedOPT(keras.Model):
    """Shared by every Keras OPT class: building, loading, saving, Keras config and `fit`'s loss.

    Subclasses set `head` ("base", "causal_lm", "sequence_classification" or "question_answering") and
    `hf_loss(outputs, labels)`.

    Args:
        config: the model's OPTConfig.
        **kwargs: Keras model arguments: `name`, and `dtype` (a policy such as "mixed_bfloat16").
    """

    head = "base"

    def __init__(self, config: OPTConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def __call__(self, input_ids=None, *args, **kwargs):
        if isinstance(input_ids, Mapping):  # fit / evaluate / predict pass a dataset's dict of inputs as one value
            kwargs = {**input_ids, **kwargs}
            input_ids = kwargs.pop("input_ids", None)
        return super().__call__(input_ids, *args, **kwargs)

    def get_input_embeddings(self) -> keras.layers.Embedding:
        decoder = self.decoder if hasattr(self, "decoder") else self.model.decoder
        return decoder.embed_tokens

    def init_cache(self, batch_size: int, max_length: int):
        """An empty static cache (`opt_tf.modeling.KVCache`) of max_length slots, in the compute dtype."""
        from opt_tf.modeling import KVCache  # modeling builds on this module

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
        return loss

    def predict_step(self, data):
        # Keras' predict concatenates a dict of batch-first tensors; caches are left out.
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        out = self(x, training=False, use_cache=False)
        return {name: out[name] for name in out}

    # ----- canonical names

    def _module_name(self, canonical: str) -> str:
        return canonical.removeprefix("model.") if self.head == "base" else canonical

    def keras_variable(self, canonical: str, kind: str) -> keras.Variable:
        """The variable of a canonical parameter: its module path as attributes, then the Keras leaf name."""
        layer = self
        for part in self._module_name(canonical).split(".")[:-1]:
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        return getattr(layer, LEAF_RULES["keras"].leaves[kind])

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
        config: OPTConfig | None = None,
        dtype: Any = None,
        fmt: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        **config_overrides: Any,
    ):
        """Loads a model from a local folder, the HF cache, or the hub, from any format opt_core reads.

        Args:
            name_or_path: a folder written by `save_pretrained` (in any framework, or by HF), or a hub id.
            config: use this config instead of the folder's config.json.
            dtype: float32 by default, whatever the checkpoint stores; "auto" keeps the stored dtype; "float16",
                "bfloat16", or a mixed policy ("mixed_bfloat16": float32 variables, bfloat16 compute).
            fmt: read this format ("safetensors", "pytorch", "tf", "flax") when the folder holds several.
            revision, cache_dir, local_files_only, token: passed to huggingface_hub for hub ids.
            **config_overrides: config fields to override, as HF (e.g. `num_labels=3`).
        """
        folder = resolve_model(
            name_or_path,
            formats=(fmt,) if fmt else None,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if config is None:
            config = OPTConfig.from_pretrained(folder, **config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        match = load_checkpoint(folder, config, cls.head, fmt=fmt)
        stored = match.tensors["model.decoder.embed_tokens.weight"].dtype
        with _without_init():
            model = cls(config, dtype=resolve_dtype(dtype, stored))
        model._assign(match)
        if hasattr(model, "generate"):
            model.generation_config = load_generation_config(folder, config)
        return model

    def _assign(self, match) -> None:
        for name, array in match.tensors.items():
            variable = self.keras_variable(name, kind_of(name))
            # One copy per tensor, cast on the way: the memory-mapped file is never read twice.
            variable.assign(tf.cast(to_style_layout(np.asarray(array), kind_of(name), "keras"), variable.dtype))
        fresh = keras.initializers.RandomNormal(stddev=self.config.init_std)
        for spec in match.missing_head_params:  # a task head the checkpoint lacks starts fresh, as HF's does
            variable = self.keras_variable(spec.name, spec.kind)
            variable.assign(
                tf.zeros_like(variable) if spec.kind == DENSE_BIAS else fresh(variable.shape, variable.dtype)
            )

    # ----- saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        fmt: str = "tf",
        max_shard_size: int | str = "5GB",
        dtype: str | None = None,
    ) -> list[Path]:
        """Writes config.json and the weights as HF does; every framework's `from_pretrained` reads the folder.

        Args:
            save_directory: the folder; created if needed.
            fmt: "tf" (tf_model.h5 in HF's Keras-2 layout, the default), "safetensors", "pytorch" or "flax".
            max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
            dtype: cast the weights to this dtype on the way out, one tensor at a time (default: as the variables;
                h5 stores bfloat16 as float32).
        """
        folder = Path(save_directory)
        config = self.config.replace(dtype=dtype or self.dtype_policy.variable_dtype)
        # As HF's TF port: the architecture is named without the "TF" prefix, so every framework reads it.
        config.extra["architectures"] = [type(self).__name__.removeprefix("TF")]
        config.save_pretrained(folder)
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.save_pretrained(folder)
        return save_checkpoint(
            self.canonical_state(lazy=True),
            folder,
            config,
            self.head,
            fmt=fmt,
            max_shard_size=max_shard_size,
            dtype=dtype,
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
