"""The public Flax model wrapper, `from_pretrained` / `save_pretrained`: the glue between `opt_core` and Linen.

Siblings: `opt_torch/pretrained.py`, `opt_tf/pretrained.py`. What needs no framework (resolving the folder or hub
id, config.json and its overrides, reading and checking any checkpoint format, fresh task heads, the dtype rules,
writing config.json, generation_config.json and the weights) is `opt_core.pretrained`; this module only turns
canonical numpy arrays into the params pytree and back. The Flax leaf rule of `opt_core.weights` (dense `kernel`
transposed to [in, out], `embedding`, LayerNorm `scale` / `bias`, layers as `layers/0`) maps every canonical name
to its place in the pytree (`opt_flax.sharding.flax_key`), which is HF's Flax layout: `{"model": {"decoder":
...}, "lm_head": {"kernel"}}` (lm_head only when untied); a bare `FlaxOPTModel` holds `{"decoder": ...}`.

`FlaxPreTrainedOPT` plays HF's `FlaxPreTrainedModel`: it holds the config, the Linen module and `params`, and its
`__call__(input_ids, attention_mask, position_ids, params, past_key_values, ...)` is a pure function of its
arrays and `params`, so `jax.jit(model.__call__)` compiles once per input shape.

Loading turns one tensor at a time (safetensors memory-mapped) into a device array of `param_dtype`, so the model
is never held twice; with a `mesh`, each array goes straight to its shards (`opt_flax.sharding`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opt_core.config import OPTConfig
from opt_core.dtypes import resolve_dtype
from opt_core.errors import CheckpointError
from opt_core.flax_msgpack import flatten, unflatten
from opt_core.formats import DEFAULT_MAX_SHARD_SIZE
from opt_core.inputs import check_numeric
from opt_core.lazy import copy_released
from opt_core.pretrained import load_pretrained, save_format
from opt_core.pretrained import save_pretrained as save_folder
from opt_core.weights import fresh_parameter, parameter_specs, to_style_layout
from opt_flax.cache import KVCache
from opt_flax.lora import LoraMixin, base_params, use_adapter_values
from opt_flax.sharding import flat_shardings, flax_key


def params_from_canonical(
    tensors: Mapping[str, np.ndarray],
    config: OPTConfig,
    head: str,
    dtype: Any = jnp.float32,
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    rng: np.random.Generator | None = None,
) -> dict:
    """Canonical torch-layout arrays -> the params pytree, in `dtype`, one tensor at a time.

    Args:
        tensors: {canonical name: array}, e.g. `opt_core.pretrained.load_pretrained(...).tensors`.
        config, head: the model the params are for.
        dtype: the params' dtype.
        shardings: {flax key: sharding} to place each array on; default the default device.
        rng: draws every parameter absent from `tensors` as HF initialises it (`opt_core.weights.fresh_parameter`);
            None: a parameter absent from `tensors` is an error.
    """
    flat = {}
    for spec in parameter_specs(config, head):
        if spec.name in tensors:
            array = tensors[spec.name]
        elif rng is not None:
            array = fresh_parameter(spec, config, rng)
        else:
            raise CheckpointError(f"parameter {spec.name!r} is missing")
        key = flax_key(spec, head)
        flat[key] = _device_array(array, spec.kind, dtype, shardings[key] if shardings else None)
    return unflatten(flat)


def _device_array(array: np.ndarray, kind: str, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """One parameter on its device(s) in `dtype`, Flax layout.

    A host copy in the target dtype (the source may be a read-only memory map that must not be aliased), made a
    block at a time with the file's pages released behind it (`opt_core.lazy.copy_released`), so loading holds
    the params and one block of the file; the device array then adopts that copy where XLA can (CPU)."""
    host = copy_released(array, dtype, transpose=to_style_layout(array, kind, "flax") is not array)
    return jax.device_put(host, sharding, may_alias=True)


def params_to_canonical(params: Mapping, config: OPTConfig, head: str) -> dict[str, np.ndarray]:
    """The params pytree -> {canonical name: torch-layout numpy array}; every path and shape is checked.

    A LoRA adapter's leaves (`opt_flax.lora`) are not the model's parameters and are left out: this is the base
    (with the deltas of a merged adapter)."""
    expected = {flax_key(spec, head): spec for spec in parameter_specs(config, head)}
    flat = flatten(jax.device_get(base_params(params)))
    problems = [f"unexpected {key!r}" for key in flat if key not in expected]
    problems += [f"missing {key!r}" for key in expected if key not in flat]
    canonical = {}
    for key, array in flat.items():
        spec = expected.get(key)
        if spec is None:
            continue
        array = to_style_layout(np.asarray(array), spec.kind, "flax")  # a transpose is its own inverse
        if array.shape != spec.shape:
            problems.append(f"{key!r} has shape {array.shape}, the config needs {spec.shape} (torch layout)")
        canonical[spec.name] = array
    if problems:
        raise CheckpointError("the params do not match the model's configuration: " + "; ".join(problems))
    return canonical


class FlaxPreTrainedOPT(LoraMixin):
    """Shared by every Flax OPT model: holds config, Linen module and params; init, call, load, save; LoRA
    adapters in PEFT's files (`opt_flax.lora.LoraMixin`: add_adapter, load_adapter, set_adapter, ...).

    Subclasses set `head` ("base", "causal_lm", "sequence_classification" or "question_answering") and
    `module_class` (their Linen module).

    Args:
        config: the model's OPTConfig.
        dtype: the compute dtype (float32 by default).
        param_dtype: the dtype of the params (float32 by default).
        seed: the seed of freshly initialised params.
        _do_init: initialise params now; False leaves `params` None (from_pretrained fills it).
    """

    head = "base"
    module_class: Any = None

    def __init__(
        self,
        config: OPTConfig,
        dtype: Any = None,
        param_dtype: Any = None,
        seed: int = 0,
        _do_init: bool = True,
    ):
        self.config = config
        self.dtype = jnp.dtype(resolve_dtype(dtype))
        self.param_dtype = jnp.dtype(resolve_dtype(param_dtype))
        self.module = self.module_class(config, self.dtype, self.param_dtype)
        self.params = self.init_weights(seed) if _do_init else None

    def init_weights(self, seed: int = 0) -> dict:
        """Fresh params as HF initialises them: normal(init_std) kernels and embeddings, zero biases, unit norms.

        Drawn on the host from the parameter table, one tensor at a time (`opt_core.weights.fresh_parameter`, which
        also initialises a task head a checkpoint lacks): no XLA compile. `self.module.init(rng, input_ids)` draws
        the same distributions with JAX's RNG, for Linen users.
        """
        rng = np.random.default_rng(seed)
        return params_from_canonical({}, self.config, self.head, self.param_dtype, rng=rng)

    def init_cache(self, batch_size: int, max_length: int):
        """A zeroed `KVCache` for `batch_size` rows of up to `max_length` positions (prompt + new tokens)."""
        return KVCache.create(self.config, batch_size, max_length, self.dtype)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        params: Mapping | None = None,
        past_key_values=None,
        inputs_embeds=None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        **kwargs: Any,
    ):
        """Runs the model; inference (no dropout) unless `train=True` with a `dropout_rng`.

        Args:
            input_ids: B T token ids (or T); or pass `inputs_embeds` (B T E) instead.
            attention_mask: B T, 1 for real tokens and 0 for padding; with a cache, B S over the whole cache.
            position_ids: B T; by default OPT's `cumsum(mask) * mask - 1` (after the cache's tokens).
            params: the params pytree; `self.params` when None. An active LoRA adapter's leaves in it are applied
                (`opt_flax.lora`), so `jax.jit(model.__call__)(..., params=model.params)` follows `set_adapter`.
            past_key_values: a `KVCache` from `init_cache` (or a previous output) for cached decoding.
            output_attentions, output_hidden_states, return_dict: as HF; keep them static under jit.
            train, dropout_rng: dropout needs both (keep `train` static under jit).
            **kwargs: head-specific options of the Linen module (`logits_to_keep` for the causal LM).
        """
        if train and dropout_rng is None:
            raise ValueError("train=True applies dropout and needs a dropout_rng (a jax.random key)")
        check_numeric(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        out = self.module.apply(
            {"params": use_adapter_values(self.params if params is None else params)},
            _as_array(input_ids),
            _as_array(attention_mask),
            _as_array(position_ids),
            past_key_values,
            _as_array(inputs_embeds),
            output_attentions,
            output_hidden_states,
            not train,
            rngs={"dropout": dropout_rng} if train else None,
            **kwargs,
        )
        return out if return_dict else out.to_tuple()

    # ----- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = "default",
        **kwargs: Any,
    ):
        """Loads a model from a local folder, the HF cache, or the hub, in any checkpoint format.

        Args:
            name_or_path: a folder written by `save_pretrained` (here, by HF, or by opt_torch / opt_tf), or a hub id.
            dtype: the compute dtype: float32 by default whatever the checkpoint stores; "auto" keeps the stored
                dtype; float16 / bfloat16.
            param_dtype: the params' dtype, float32 by default; "auto" keeps the stored dtype.
            mesh: a `jax.sharding.Mesh` with axes ("data", "model"): each param is placed on its shards as it is
                read (`opt_flax.sharding.partition_specs`), never whole on one device.
            seed: the seed of task-head params the checkpoint lacks (initialised freshly, with a warning).
            adapter: a PEFT LoRA adapter (folder or hub id) to load after the base, as `load_adapter`; its hub
                options are `token`, `local_files_only` and `cache_dir` below (`revision` is the base's).
            adapter_name: the adapter's name.
            **kwargs: the loading options every framework shares (`opt_core.pretrained.load_pretrained`): `config`
                (instead of the folder's config.json), `fmt` (the format to read when the folder holds several),
                `revision`, `cache_dir`, `local_files_only`, `token` (huggingface_hub, for hub ids), and config
                fields to override as HF does (e.g. `num_labels=3`).
        """
        loaded = load_pretrained(name_or_path, cls.head, seed=seed, **kwargs)
        config, stored = loaded.config, loaded.stored_dtype
        model = cls(config, resolve_dtype(dtype, stored), resolve_dtype(param_dtype, stored), _do_init=False)
        shardings = flat_shardings(config, cls.head, mesh) if mesh is not None else None
        model.params = params_from_canonical(loaded.tensors, config, cls.head, model.param_dtype, shardings)
        if hasattr(model, "generate"):
            model.generation_config = loaded.generation_config
        model.name_or_path = str(name_or_path)
        if adapter is not None:
            hub = {k: kwargs[k] for k in ("token", "local_files_only", "cache_dir") if k in kwargs}
            model.load_adapter(adapter, adapter_name, **hub)
        return model

    def canonical_state(self, params: Mapping | None = None) -> dict[str, np.ndarray]:
        """{canonical name: torch-layout numpy array} of the base model (`self.params` when None); a merged
        adapter's deltas are in it, adapter leaves never are."""
        return params_to_canonical(self.params if params is None else params, self.config, self.head)

    # ----- saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: Mapping | None = None,
        *,
        safe_serialization: bool | None = None,
        fmt: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        dtype: Any = None,
    ) -> list[Path]:
        """Writes config.json, generation_config.json and the weights as HF does; every format loads in the other
        implementations and in HF transformers. Returns the weight files.

        Args:
            save_directory: the folder; created if needed. An earlier save's weights in it are replaced.
            params: the params to save; `self.params` when None.
            safe_serialization: True writes model.safetensors; False or None flax_model.msgpack (HF Flax's default).
            fmt: any format by name, "flax", "safetensors", "pytorch" (.bin) or "tf" (.h5); wins when given.
            max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
            dtype: cast the weights on the way out, one tensor at a time (default: the params' dtype).
        """
        canonical = self.canonical_state(params)
        return save_folder(
            save_directory,
            canonical,
            self.config,
            self.head,
            architecture=type(self).__name__.removeprefix("Flax"),  # HF names the torch class
            generation_config=getattr(self, "generation_config", None),
            fmt=save_format(safe_serialization, fmt, native="flax", safe_by_default=False),
            max_shard_size=max_shard_size,
            dtype=dtype,
        )


def _as_array(x: Any) -> Any:
    return None if x is None else jnp.asarray(x)
