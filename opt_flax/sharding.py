"""Partition rules over the parameter table: tensor parallel over heads, FFN and vocabulary; data parallel over batch.

Siblings: `opt_torch.distributed` (DTensor tensor parallelism of the decoder layers from the same
`opt_core.weights.TENSOR_PARALLEL` rule, and FSDP2/DDP). This module also names the params
pytree's paths (`flax_key`), which `opt_flax.pretrained` uses to load into and save from it.

A mesh has two axes, `"data"` (the batch is split over it) and `"model"` (weights are split over it, Megatron
style). The rule is stated once, per module, on the canonical torch-layout weight `[out, in]` of
`opt_core.weights`, and carried to Flax's layout by the same leaf rule that names the params:

* `q_proj`, `k_proj`, `v_proj`, `fc1`: column parallel, the output dim (heads, FFN units) is split, and so is
  the bias; each device computes its own heads / FFN slice with no communication;
* `out_proj`, `fc2`: row parallel, the input dim is split; XLA all-reduces the partial sums (bias replicated);
* `embed_tokens` and an untied `lm_head`: split over the vocabulary;
* everything else (positions, norms, project_in/out, score, qa_outputs) is replicated.

A dim is only split when the model axis divides it (whole heads for attention); otherwise it stays replicated.
The KV cache follows the heads: B S N H is split on B over "data" and on N over "model". A LoRA adapter's leaves
(`opt_flax.lora`) follow the kernel they adapt (`opt_flax.lora.adapter_partition_spec`): lora_A [in, r] is split like
its input dim, lora_B [r, out] like its output dim, copies and trained biases like what they replace, the scalars
replicated; `shard_params` places them so, and so do `add_adapter` / `load_adapter` on a model already on a mesh.

On a TPU pod (or several GPUs) a user writes::

    import jax
    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.sharding import batch_sharding, make_mesh, shard_cache

    mesh = make_mesh(model=8)  # all devices: 8-way tensor parallel, the rest data parallel
    model = FlaxOPTForCausalLM.from_pretrained("facebook/opt-66b", dtype="bfloat16", param_dtype="bfloat16",
                                               mesh=mesh)  # each param goes straight to its shards
    forward = jax.jit(model.__call__)
    ids = jax.device_put(ids, batch_sharding(mesh))  # B T, B divisible by the "data" axis
    mask = jax.device_put(mask, batch_sharding(mesh))
    logits = forward(ids, mask, params=model.params).logits  # sharded over B and V; XLA inserts collectives

Params already in memory are placed with `shard_params(params, mesh, config, head)`; a cache from
`model.init_cache` with `shard_cache(cache, mesh, config)`. Training (`opt_flax.train`, `TrainOptions.mesh`) makes
its mesh with `checked_mesh` (which refuses what the rules above would quietly replicate) and places each optax
moment like its param (`like_params`). On a multi-host pod every host runs the same program
(`jax.distributed.initialize()` first); `from_pretrained(mesh=...)` then reads the checkpoint on every host and
each host keeps only its own shards.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opt_core.config import OPTConfig
from opt_core.errors import ConfigError
from opt_core.flax_msgpack import unflatten
from opt_core.weights import (
    DENSE_BIAS,
    DENSE_WEIGHT,
    LEAF_RULES,
    TENSOR_PARALLEL,
    ParamSpec,
    module_path,
    parameter_specs,
    style_name,
)
from opt_flax.lora import adapter_partition_spec, base_key, is_adapter_key

DATA, MODEL = "data", "model"

_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # split whole heads only


def flax_key(spec: ParamSpec, head: str) -> str:
    """The `/`-joined path of a canonical parameter in the params pytree (a bare model has no `model/`)."""
    return module_path(style_name(spec.name, spec.kind, "flax"), head, sep="/")


def make_mesh(model: int = 1, devices: Any = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default all): `model`-way tensor parallel, the rest data parallel."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size % model:
        raise ValueError(f"{devices.size} devices cannot form a mesh with a model axis of {model}")
    return Mesh(devices.reshape(devices.size // model, model), (DATA, MODEL))


def checked_mesh(sizes: dict[str, int], config: OPTConfig, devices: Any = None) -> Mesh:
    """The ("data", "model") mesh of `sizes` (`opt_core.training.parse_mesh`) over `devices` (default all), after
    checking what `make_mesh` and the partition rules would otherwise work around silently.

    Raises:
        ConfigError: naming the value, when data x model is not the device count, or the model axis does not
            divide the attention heads or the FFN dim (a training mesh splits both; see `canonical_axes`).
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    data, model = sizes[DATA], sizes[MODEL]
    if data * model != devices.size:
        hint = (
            " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)"
            if data * model > 1
            else ""
        )
        raise ConfigError(f"mesh data={data},model={model} needs {data * model} devices; jax has {devices.size}{hint}")
    for name in ("num_attention_heads", "ffn_dim"):
        if getattr(config, name) % model:
            raise ConfigError(f"mesh model={model} must divide the config's {name} ({getattr(config, name)})")
    return Mesh(devices.reshape(data, model), (DATA, MODEL))


def canonical_axes(spec: ParamSpec, config: OPTConfig, model_size: int = 1) -> tuple[str | None, ...]:
    """The mesh axis of each dim of the canonical (torch-layout) parameter `spec`."""
    axes: list[str | None] = [None] * len(spec.shape)
    module = spec.name.split(".")[-2]
    dim = TENSOR_PARALLEL.get(module)
    if dim is None or (spec.kind == DENSE_BIAS and dim == 1):
        return tuple(axes)  # replicated; a row-parallel bias is added once, after the all-reduce
    units = config.num_attention_heads if module in _ATTENTION else spec.shape[dim]
    if units % model_size == 0:
        axes[dim] = MODEL
    return tuple(axes)


def flat_partition_specs(config: OPTConfig, head: str = "causal_lm", model_size: int = 1) -> dict[str, PartitionSpec]:
    """{params path ("model/decoder/layers/0/fc1/kernel"): PartitionSpec} for a model axis of `model_size`."""
    specs = {}
    for spec in parameter_specs(config, head):
        axes = canonical_axes(spec, config, model_size)
        if spec.kind == DENSE_WEIGHT and LEAF_RULES["flax"].transpose_dense:
            axes = axes[::-1]  # Flax kernels are [in, out]
        specs[flax_key(spec, head)] = PartitionSpec(*axes) if any(axes) else PartitionSpec()  # P(): replicated
    return specs


def partition_specs(config: OPTConfig, head: str = "causal_lm", mesh: Mesh | None = None) -> dict:
    """The params pytree of PartitionSpecs; with `mesh`, dims its model axis does not divide stay replicated.

    Args:
        config: the model's OPTConfig.
        head: "base", "causal_lm", "sequence_classification" or "question_answering".
        mesh: the mesh the specs are for (its "model" axis size decides divisibility); None assumes it divides.
    """
    model_size = mesh.shape[MODEL] if mesh is not None else 1
    return unflatten(flat_partition_specs(config, head, model_size))


def flat_shardings(config: OPTConfig, head: str, mesh: Mesh) -> dict[str, NamedSharding]:
    """{params path: NamedSharding} on `mesh` (what `from_pretrained(mesh=...)` places each param with)."""
    specs = flat_partition_specs(config, head, mesh.shape[MODEL])
    return {key: NamedSharding(mesh, spec) for key, spec in specs.items()}


def shard_params(params: dict, mesh: Mesh, config: OPTConfig, head: str = "causal_lm") -> dict:
    """`params` placed on `mesh` by the partition rules (a copy; the input is left as it is).

    Args:
        params: the model's params pytree (`model.params`), with or without a LoRA adapter's leaves.
        mesh: a mesh with axes ("data", "model"), e.g. from `make_mesh`.
        config, head: the model's config and head (`model.config`, `model.head`).
    """
    specs = flat_partition_specs(config, head, mesh.shape[MODEL])
    shardings = {}
    for key in flatten_dict(params, sep="/"):
        if is_adapter_key(key):
            spec = adapter_partition_spec(key, specs.get(base_key(key) or ""))
        elif key in specs:
            spec = specs[key]
        else:
            raise ValueError(f"{key!r} is not a parameter of this {head} model, nor an adapter's")
        shardings[key] = NamedSharding(mesh, spec)
    return jax.device_put(params, unflatten(shardings))


def like_params(tree: Any, params: dict, mesh: Mesh) -> Any:
    """Shardings for `tree` (an optax state): a leaf under a path that ends in a param's path, with that param's
    shape (Adam's moments), gets the param's sharding; every other leaf (step counts, hyperparams) is replicated.

    Args:
        tree: the state, or its `jax.eval_shape`.
        params: the params pytree, placed on `mesh` (`shard_params`).
        mesh: the mesh.
    """
    flat = {tuple(key.split("/")): value for key, value in flatten_dict(params, sep="/").items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf) -> NamedSharding:
        keys = tuple(str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey))
        for start in range(len(keys)):
            param = flat.get(keys[start:])
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Inputs (B T ids and masks, B S cache masks) split over the batch on the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def shard_cache(cache: Any, mesh: Mesh, config: OPTConfig) -> Any:
    """A `KVCache` placed on `mesh`: B S N H split on B over "data" and on N (whole heads) over "model"."""
    heads = MODEL if config.num_attention_heads % mesh.shape[MODEL] == 0 else None
    kv = NamedSharding(mesh, PartitionSpec(DATA, None, heads, None))
    shardings = cache.replace(
        key_values=tuple((kv, kv) for _ in cache.key_values), index=NamedSharding(mesh, PartitionSpec())
    )
    return jax.device_put(cache, shardings)
