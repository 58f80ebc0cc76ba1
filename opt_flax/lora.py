"""LoRA adapters in HF PEFT's files for the Flax models: where an adapter lives in the params pytree, the pure
functions over that pytree (`trainable_mask`, `use_adapter_values`, `merged_view`), and the PEFT-named methods
every Flax model has (`LoraMixin`: add_adapter, load_adapter, save_adapter, set_adapter, merge_adapter, ...).

Siblings: `opt_torch/lora.py`, `opt_tf/lora.py`. What needs no framework (LoraConfig, PEFT's module matching and
scalings, the file names, the initialisation, reading and writing the files) is `opt_core.adapters`.

Where an adapter lives. JAX users call `jax.jit(model.__call__)(ids, mask, params=model.params)`, and a jitted
function reads Python state only when it traces: an active adapter kept as model attributes would be baked into the
first trace and go stale after `set_adapter`. So `model.params` holds exactly what the forward computes with, and
the active, enabled adapter's tensors sit in it next to what they adapt (one adapter at a time, under fixed names;
switching adapters changes leaves or the tree's structure, never a traced constant)::

    .../self_attn/q_proj/kernel, bias       the base, untouched
    .../self_attn/q_proj/lora_A/kernel      [in, r]  float32: PEFT's lora_A.weight [r, in], transposed as kernels are
    .../self_attn/q_proj/lora_B/kernel      [r, out] float32
    .../self_attn/q_proj/lora_scaling       ()       alpha / r (alpha / sqrt(r) with rsLoRA)
    .../self_attn/q_proj/lora_dropout       ()       the dropout rate of the LoRA branch's input (training only)
    .../score/modules_to_save/kernel        a modules_to_save copy, used in place of score/kernel
    .../self_attn/q_proj/trained_bias       a bias trained by bias="all" / "lora_only", used in place of q_proj/bias

`OPTDense` adds the branch `scaling * B(A(dropout(x)))` when its params hold `lora_scaling`; the model's `__call__`
swaps copies and trained biases in (`use_adapter_values`) before `module.apply`. The scaling and dropout rate are
leaves for the same jit reason; `trainable_mask` leaves them frozen. The other adapters, and the active one while
adapters are disabled, wait on the model (outside the pytree), so a disabled model's params are the base's alone
and it computes the base exactly. Merged, the active adapter's deltas are added to the base kernels and its copies
and biases written over the base's (the originals kept for `unmerge_adapter`); its branch leaves leave the pytree.

`canonical_state` / `save_pretrained` write the base model (merged deltas included when merged), never adapter
leaves (`base_params`). As in PEFT, where bias="all" / "lora_only" trains the base layers' biases, the active
adapter's trained biases are the base's biases there; but each adapter keeps its own values (as it keeps its
modules_to_save copies), so switching, disabling or deleting adapters gives the base model back bit for bit (PEFT's
disabled model would keep the last trained biases).

Training: an optimizer split by `trainable_mask` (`optax.multi_transform`, as `opt_flax.train` builds it) updates
only the LoRA tensors, the copies and the trained biases, and holds no state for the frozen base.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from opt_core.adapters import (
    AdapterMethods,
    AdapterPlan,
    LoraConfig,
    ParameterCount,
)
from opt_core.weights import DENSE_WEIGHT, module_path, parameter_specs, style_name, to_style_layout

LORA_A, LORA_B = "lora_A", "lora_B"
LORA_SCALING, LORA_DROPOUT = "lora_scaling", "lora_dropout"
COPY, TRAINED_BIAS = "modules_to_save", "trained_bias"
_BRANCH = (LORA_A, LORA_B, LORA_SCALING, LORA_DROPOUT)
_TRAINABLE_SUBTREES = (LORA_A, LORA_B, COPY)

__all__ = ["LoraConfig", "LoraMixin", "base_params", "merged_view", "trainable_mask", "use_adapter_values"]


# ----- the params pytree: pure functions, jit-safe


def is_adapter_key(key: str) -> bool:
    """Whether a `/`-joined params path is an adapter leaf (not a base parameter)."""
    *modules, leaf = key.split("/")
    return leaf in (LORA_SCALING, LORA_DROPOUT, TRAINED_BIAS) or any(m in _TRAINABLE_SUBTREES for m in modules)


def base_key(key: str) -> str | None:
    """The base parameter an adapter leaf stands next to: its module's kernel for lora_A / lora_B, the replaced
    parameter for a copy or a trained bias; None for the scalars and for base parameters."""
    parts = key.split("/")
    if len(parts) > 2 and parts[-2] in (LORA_A, LORA_B):
        return "/".join([*parts[:-2], "kernel"])
    if len(parts) > 2 and parts[-2] == COPY:
        return "/".join([*parts[:-2], parts[-1]])
    if parts[-1] == TRAINED_BIAS:
        return "/".join([*parts[:-1], "bias"])
    return None


def trainable_mask(params: Mapping) -> Any:
    """The params pytree of bools an optax mask takes: True on the LoRA tensors, the modules_to_save copies and
    the trained biases (what PEFT leaves trainable), False on the base and on the scaling / dropout leaves.

    Use: `optax.multi_transform({True: optax.adamw(...), False: optax.set_to_zero()}, trainable_mask)`, or see
    `opt_flax.train.build_optimizer`. Masking the optimizer alone (`optax.masked`) passes the frozen leaves' raw
    gradients through as updates: zero them as well.
    """

    def rule(path, _) -> bool:
        keys = [str(getattr(entry, "key", entry)) for entry in path]
        return keys[-1] == TRAINED_BIAS or any(k in _TRAINABLE_SUBTREES for k in keys[:-1])

    return jax.tree_util.tree_map_with_path(rule, params)


def base_params(params: Mapping) -> dict:
    """The base model's parameters as PEFT's model holds them (what is saved as the model): adapter leaves
    dropped, except that a trained bias stands in for its layer's bias."""
    if not isinstance(params, Mapping):
        return params
    out = {}
    for name, value in params.items():
        if name in (*_BRANCH, COPY, TRAINED_BIAS):
            continue
        value = base_params(value)
        if not isinstance(value, Mapping) or value:
            out[name] = value
    if TRAINED_BIAS in params:
        out["bias"] = params[TRAINED_BIAS]
    return out


def use_adapter_values(params: Mapping) -> dict:
    """The params the modules read: each modules_to_save copy and trained bias in place of the base's value (the
    LoRA branch leaves stay, for `OPTDense`). Params without an adapter come back as they are (a new dict)."""
    if not isinstance(params, Mapping):
        return params
    out = {name: use_adapter_values(value) for name, value in params.items() if name not in (COPY, TRAINED_BIAS)}
    if COPY in params:
        out.update(params[COPY])
    if TRAINED_BIAS in params:
        out["bias"] = params[TRAINED_BIAS]
    return out


def merged_view(params: Mapping) -> dict:
    """`use_adapter_values` with every LoRA branch merged into its kernel (as `merge_adapter` merges it, so the
    values are identical): what `generate`'s decode layout is built from."""

    def merge(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {name: merge(value) for name, value in tree.items() if name not in _BRANCH}
        if LORA_SCALING in tree:
            a, b = tree[LORA_A]["kernel"], tree[LORA_B]["kernel"]
            out["kernel"] = merged_kernel(tree["kernel"], a, b, tree[LORA_SCALING])
        return out

    return merge(use_adapter_values(params))


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: Any, sign: int = 1) -> jax.Array:
    """`kernel + sign * scaling * A @ B` ([in, out]; the torch-layout delta `scaling * B @ A` transposed), computed
    in float32 at full matmul precision and stored in the kernel's dtype."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    delta = jnp.asarray(scaling, jnp.float32) * delta
    kernel32 = kernel.astype(jnp.float32)
    return (kernel32 + delta if sign > 0 else kernel32 - delta).astype(kernel.dtype)


def lora_branch(inputs, params: Mapping, dtype, precision, dropout_rng: jax.Array | None) -> jax.Array:
    """`scaling * B(A(dropout(x)))` of one wrapped dense layer, in the compute dtype (the float32 LoRA tensors are
    cast to it, as PEFT's autocast_adapter_dtype keeps them and casts them in forward). Dropout only with a
    `dropout_rng` (training); the rate is a leaf, so `jnp.where` rather than `nn.Dropout`'s static rate."""
    x = inputs.astype(dtype)
    if dropout_rng is not None:
        rate = params[LORA_DROPOUT]
        keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(dtype), jnp.zeros((), dtype))
    a, b = params[LORA_A]["kernel"].astype(dtype), params[LORA_B]["kernel"].astype(dtype)  # in r, r out
    contract = lambda lhs, rhs: lax.dot_general(  # noqa: E731
        lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())), precision=precision
    )
    return contract(contract(x, a), b) * params[LORA_SCALING].astype(dtype)  # B T in -> B T r -> B T out


def adapter_partition_spec(key: str, base_spec: PartitionSpec | None) -> PartitionSpec:
    """The sharding of an adapter leaf, from its base parameter's (`base_key`): lora_A [in, r] is split like the
    kernel's input dim and lora_B [r, out] like its output dim, so a column-parallel layer's branch needs no
    collective and a row-parallel one only an all-reduce over r; copies and trained biases are split as what they
    replace; the scalars (and anything over a replicated kernel) are replicated."""
    if base_spec is None:
        return PartitionSpec()
    axes = (*tuple(base_spec), None, None)
    if key.endswith(f"/{LORA_A}/kernel"):
        return PartitionSpec(axes[0], None) if axes[0] else PartitionSpec()
    if key.endswith(f"/{LORA_B}/kernel"):
        return PartitionSpec(None, axes[1]) if axes[1] else PartitionSpec()
    return base_spec


# ----- canonical (torch-layout, PEFT's) tensors <-> adapter leaves


def _flax_key(name: str, kind: str, head: str) -> str:
    # The leaf rule of `opt_flax.sharding.flax_key` (not imported: sharding imports this module).
    return module_path(style_name(name, kind, "flax"), head, sep="/")


def _module_key(module: str, head: str) -> str:
    return _flax_key(module + ".weight", DENSE_WEIGHT, head).rsplit("/", 1)[0]


def _saved_keys(plan: AdapterPlan, config, head: str) -> dict[str, tuple[str, str, str]]:
    """{canonical name: (adapter leaf key, base key, kind)} of the parameters the adapter carries whole."""
    specs = {spec.name: spec for spec in parameter_specs(config, head)}
    out = {}
    for name in plan.saved:
        spec = specs[name]
        base = _flax_key(name, spec.kind, head)
        module, leaf = base.rsplit("/", 1)
        key = f"{module}/{COPY}/{leaf}" if name in plan.module_copies else f"{module}/{TRAINED_BIAS}"
        out[name] = (key, base, spec.kind)
    return out


def to_leaves(plan: AdapterPlan, tensors: Mapping[str, np.ndarray], config, flat_params: Mapping) -> dict:
    """An adapter's canonical tensors as its leaves (host arrays): LoRA pairs transposed, in float32; copies and
    trained biases in the dtype of the base parameter they stand in for."""
    head, leaves = plan.head, {}
    for slot in plan.slots.values():
        module = _module_key(slot.module, head)
        leaves[f"{module}/{LORA_A}/kernel"] = np.asarray(tensors[slot.a_name], np.float32).T  # in r
        leaves[f"{module}/{LORA_B}/kernel"] = np.asarray(tensors[slot.b_name], np.float32).T  # r out
        leaves[f"{module}/{LORA_SCALING}"] = np.asarray(slot.scaling, np.float32)
        leaves[f"{module}/{LORA_DROPOUT}"] = np.asarray(plan.config.lora_dropout, np.float32)
    for name, (key, base, kind) in _saved_keys(plan, config, head).items():
        value = to_style_layout(np.asarray(tensors[name]), kind, "flax")
        leaves[key] = np.asarray(value, dtype=flat_params[base].dtype)
    return leaves


def to_canonical(plan: AdapterPlan, leaves: Mapping, config) -> dict[str, np.ndarray]:
    """The inverse of `to_leaves`: {canonical name: torch-layout numpy array} for `write_adapter`."""
    head, out = plan.head, {}
    for slot in plan.slots.values():
        module = _module_key(slot.module, head)
        out[slot.a_name] = np.asarray(jax.device_get(leaves[f"{module}/{LORA_A}/kernel"])).T
        out[slot.b_name] = np.asarray(jax.device_get(leaves[f"{module}/{LORA_B}/kernel"])).T
    for name, (key, _, kind) in _saved_keys(plan, config, head).items():
        out[name] = to_style_layout(np.asarray(jax.device_get(leaves[key])), kind, "flax")
    return out


def adapter_keys(plan: AdapterPlan, config) -> list[str]:
    """Every leaf key of the adapter in the params pytree."""
    keys = [f"{_module_key(slot.module, plan.head)}/{leaf}" for slot in plan.slots.values() for leaf in _BRANCH]
    keys = [k + "/kernel" if k.endswith((LORA_A, LORA_B)) else k for k in keys]
    return keys + [key for key, _, _ in _saved_keys(plan, config, plan.head).values()]


def _place(key: str, value: np.ndarray, flat_params: Mapping) -> jax.Array:
    """A new leaf on the device(s) of its base parameter; on a mesh, sharded by `adapter_partition_spec`."""
    reference = flat_params.get(base_key(key) or key.rsplit("/", 1)[0] + "/kernel")
    sharding = getattr(reference, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = adapter_partition_spec(key, sharding.spec if base_key(key) else None)
        return jax.device_put(value, NamedSharding(sharding.mesh, spec))
    return jnp.asarray(value)


def _is_overlay(key: str) -> bool:
    """A copy or trained bias: a leaf used in place of a base parameter (not part of the LoRA branch)."""
    return base_key(key) is not None and key.split("/")[-2] not in (LORA_A, LORA_B)


def _add_deltas(flat: dict, leaves: Mapping, sign: int) -> dict:
    """`flat` (flat params) with each LoRA pair of `leaves` merged into (sign 1) or out of (-1) its kernel."""
    for key, scaling in leaves.items():
        if key.endswith("/" + LORA_SCALING):
            module = key.rsplit("/", 1)[0]
            a, b = leaves[f"{module}/{LORA_A}/kernel"], leaves[f"{module}/{LORA_B}/kernel"]
            flat[f"{module}/kernel"] = merged_kernel(flat[f"{module}/kernel"], a, b, scaling, sign)
    return flat


# ----- the model's methods


@dataclasses.dataclass
class _Adapter:
    """One adapter of a model: its plan, and its leaves while they are not in the params (inactive, disabled or
    merged; empty while they are)."""

    plan: AdapterPlan
    leaves: dict[str, jax.Array]
    trainable: bool = True


@dataclasses.dataclass
class _LoraState:
    adapters: dict[str, _Adapter] = dataclasses.field(default_factory=dict)
    active: str | None = None
    enabled: bool = True
    merged: bool = False
    originals: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # base values a merge wrote over


class LoraMixin(AdapterMethods):
    """PEFT's adapter methods (named as in HF transformers' PEFT integration) for `FlaxPreTrainedOPT`, which
    provides `config`, `head` and `params`; `add_adapter`, `load_adapter`, `save_adapter` are
    `opt_core.adapters.AdapterMethods`'. See the module docstring for where the adapter's tensors live."""

    _lora: _LoraState | None = None

    # ----- adding, loading, saving

    def adapter_arrays(self, adapter_name: str | None = None) -> tuple[AdapterPlan, dict[str, np.ndarray]]:
        """(plan, {canonical name: torch-layout numpy array}) of an adapter (default the active one): its LoRA
        pairs, modules_to_save copies and trained biases, as `opt_core.adapters.write_adapter` takes them."""
        name = adapter_name if adapter_name is not None else self._require_active("read an adapter")
        plan = self._adapter(name).plan
        return plan, to_canonical(plan, self._current_leaves(name), self.config)

    # ----- which adapter is used

    @property
    def active_adapter(self) -> str | None:
        """The active adapter's name (used while adapters are enabled), or None."""
        return self._lora.active if self._lora is not None else None

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """{adapter name: its LoraConfig} (with the head's task type and modules_to_save filled in, as PEFT)."""
        return {name: a.plan.config for name, a in self._lora.adapters.items()} if self._lora is not None else {}

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the active adapter (ValueError naming it if the model has none of that name)."""
        self._adapter(adapter_name)
        state = self._lora
        self._unmerge_before("set_adapter")
        self._detach()
        state.active = adapter_name
        self._attach()

    def disable_adapters(self) -> None:
        """The base model alone (bit for bit) until `enable_adapters`; a merged adapter is unmerged first."""
        state = self._require_state("disable adapters")
        if state.merged:
            self.unmerge_adapter()
        self._detach()
        state.enabled = False

    def enable_adapters(self) -> None:
        """Uses the active adapter again."""
        state = self._require_state("enable adapters")
        state.enabled = True
        self._attach()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter; if it was the active one, the next remaining adapter (if any) becomes active."""
        self._adapter(adapter_name)
        state = self._lora
        if state.active == adapter_name:
            if state.merged:
                self.unmerge_adapter()
            self._detach()
            remaining = [name for name in state.adapters if name != adapter_name]
            state.active = remaining[0] if remaining else None
        del state.adapters[adapter_name]
        self._attach()

    # ----- merging

    def merge_adapter(self) -> None:
        """Adds the active adapter's `scaling * B @ A` to the base kernels in place (float32, stored in the
        kernels' dtype) and writes its copies and trained biases over the base's; forward then runs without the
        LoRA branch. Nothing happens if it is merged already."""
        state = self._require_state("merge")
        name = self._require_active("merge")
        if state.merged:
            return
        if not state.enabled:
            raise ValueError("adapters are disabled: call enable_adapters() before merging")
        self._detach()
        leaves = state.adapters[name].leaves
        flat = _add_deltas(flatten_dict(self.params, sep="/"), leaves, sign=1)
        for key, value in leaves.items():
            if _is_overlay(key):
                state.originals[base_key(key)] = flat[base_key(key)]
                flat[base_key(key)] = value
        self.params = unflatten_dict(flat, sep="/")
        state.merged = True

    def unmerge_adapter(self) -> None:
        """Subtracts the merged adapter's deltas again and restores the base's copies and biases."""
        state = self._require_state("unmerge")
        if not state.merged:
            return
        flat = _add_deltas(flatten_dict(self.params, sep="/"), state.adapters[state.active].leaves, sign=-1)
        flat.update(state.originals)
        state.originals, state.merged = {}, False
        self.params = unflatten_dict(flat, sep="/")
        self._attach()

    def merge_and_unload(self):
        """Merges the active adapter and drops every adapter: a plain model (its `save_pretrained` writes the
        merged weights, which HF loads). Returns the model."""
        if self._lora is None:
            return self
        if self._lora.active is not None:
            self.merge_adapter()
        self._lora = None
        self.params = base_params(self.params)
        return self

    # ----- training

    def trainable_mask(self, params: Mapping | None = None) -> Any:
        """`trainable_mask(params)` (default `self.params`); all False while the active adapter was loaded with
        `is_trainable=False`."""
        params = self.params if params is None else params
        mask = trainable_mask(params)
        adapter = self._lora.adapters.get(self._lora.active) if self._lora is not None else None
        if adapter is not None and not adapter.trainable:
            return jax.tree.map(lambda _: False, mask)
        return mask

    def trainable_parameters(self) -> ParameterCount:
        """(trainable, total) counted as PEFT's get_nb_trainable_parameters: the total is the base's parameters
        plus every adapter's LoRA tensors and modules_to_save copies; trainable is the active adapter's LoRA
        tensors, copies and trained biases (everything, without adapters)."""
        total = sum(math.prod(spec.shape) for spec in parameter_specs(self.config, self.head))
        if self._lora is None or not self._lora.adapters:
            return ParameterCount(total, total)
        trainable = 0
        for name, adapter in self._lora.adapters.items():
            plan = adapter.plan
            copies = sum(math.prod(plan.saved_shapes[n]) for n in plan.module_copies)
            total += plan.num_lora_parameters() + copies
            if name == self._lora.active and adapter.trainable:
                biases = sum(math.prod(plan.saved_shapes[n]) for n in plan.trained_biases)
                trainable += plan.num_lora_parameters() + copies + biases
        return ParameterCount(trainable, total)

    # ----- bookkeeping: the active adapter's leaves in or out of the params

    def _attach_adapter(self, name: str, plan: AdapterPlan, tensors: Mapping, trainable: bool) -> None:
        """Registers the adapter and activates it; saved parameters `tensors` lacks (a fresh adapter's copies and
        trained biases) start as the base's own values."""
        if self.params is None:
            raise ValueError("the model has no params yet (made with _do_init=False): load or set them first")
        self._unmerge_before("adding an adapter")
        flat = flatten_dict(self.params, sep="/")  # the base's own values sit at the base keys
        tensors = dict(tensors)
        for canonical, (_, base, kind) in self._saved(plan).items():
            if canonical not in tensors:
                tensors[canonical] = to_style_layout(np.asarray(jax.device_get(flat[base])), kind, "flax")
        if self._lora is None:
            self._lora = _LoraState()
        leaves = {k: _place(k, v, flat) for k, v in to_leaves(plan, tensors, self.config, flat).items()}
        self._detach()
        self._lora.adapters[name] = _Adapter(plan, leaves, trainable)
        self._lora.active, self._lora.enabled = name, True
        self._attach()

    def _unmerge_before(self, action: str) -> None:
        if self._lora is not None and self._lora.merged:
            warnings.warn(f"{action} unmerges the merged adapter first", stacklevel=3)
            self.unmerge_adapter()

    def _saved(self, plan: AdapterPlan) -> dict[str, tuple[str, str, str]]:
        return _saved_keys(plan, self.config, self.head)

    def _attached(self) -> str | None:
        """The adapter whose leaves are in the params now (active, enabled, unmerged), or None."""
        state = self._lora
        if state is None or state.active is None or not state.enabled or state.merged:
            return None
        return state.active

    def _detach(self) -> None:
        """Moves the attached adapter's leaves out of the params onto the adapter."""
        name = self._attached()
        if name is None:
            return
        flat = flatten_dict(self.params, sep="/")
        leaves = self._leaves_in(flat, name)
        self._lora.adapters[name].leaves = leaves
        self.params = unflatten_dict({k: v for k, v in flat.items() if k not in leaves}, sep="/")

    def _attach(self) -> None:
        """Moves the active adapter's leaves into the params, if adapters are enabled and it is not merged."""
        name = self._attached()
        if name is None:
            return
        adapter = self._lora.adapters[name]
        if not adapter.leaves:
            return  # already in
        self.params = unflatten_dict({**flatten_dict(self.params, sep="/"), **adapter.leaves}, sep="/")
        adapter.leaves = {}

    def _current_leaves(self, name: str) -> dict:
        if self._attached() == name:
            return self._leaves_in(flatten_dict(self.params, sep="/"), name)
        return self._lora.adapters[name].leaves

    def _leaves_in(self, flat: Mapping, name: str) -> dict:
        """The attached adapter's leaves in the flat params; a clear error if `model.params` lost them."""
        keys = adapter_keys(self._lora.adapters[name].plan, self.config)
        missing = [key for key in keys if key not in flat]
        if missing:
            raise ValueError(
                f"model.params lacks the leaves of the active adapter {name!r} (e.g. {missing[0]!r}): params set "
                "while it was active must keep them (or call disable_adapters() before setting base params)"
            )
        return {key: flat[key] for key in keys}

    def _adapter(self, name: str) -> _Adapter:
        adapters = self._lora.adapters if self._lora is not None else {}
        if name not in adapters:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(adapters) or 'none'}")
        return adapters[name]

    def _require_state(self, action: str) -> _LoraState:
        if self._lora is None or not self._lora.adapters:
            raise ValueError(f"cannot {action}: the model has no adapter (add_adapter or load_adapter first)")
        return self._lora

    def _require_active(self, action: str) -> str:
        state = self._require_state(action)
        if state.active is None:
            raise ValueError(f"cannot {action}: no adapter is active (set_adapter first)")
        return state.active
