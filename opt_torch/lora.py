"""LoRA adapters for the PyTorch models, in HF PEFT's files, with the API of HF transformers' PEFT integration.

Siblings: `opt_tf/lora.py`, `opt_flax/lora.py`. What needs no framework (the config, PEFT's module matching, fresh
values, the files) is `opt_core.adapters`; here is where an adapter lives on an `nn.Module` and how it computes.

* `LoraLinear` is an `nn.Linear` that keeps the base layer's own `weight` and `bias` (same parameters, same names,
  so `state_dict()`'s base entries and `canonical_state()` do not change) and adds PEFT's internal names:
  `lora_A[adapter]`, `lora_B[adapter]` (bias-free Linears, float32) and `lora_dropout[adapter]`.
* A module in `modules_to_save` gets `modules_to_save[adapter]`, each adapter's own copy, which runs in the
  module's place while that adapter is active (PEFT's ModulesToSaveWrapper, without renaming the original).
* Biases an adapter trains (bias="all" / "lora_only") are the base biases themselves, as in PEFT, but the model
  keeps the base's own values and each adapter's apart, and puts the acting adapter's in: disabling the adapters
  gives the base model exactly, and two adapters with biases do not overwrite each other.

`LoraMixin` is mixed into `opt_torch.pretrained.PreTrainedOPT`; `AdapterState` is the bookkeeping that PEFT keeps
in its PeftModel.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opt_core.adapters import (
    AdapterMethods,
    AdapterPlan,
    LoraConfig,
    ParameterCount,
)
from opt_core.errors import ConfigError
from opt_core.weights import module_path
from opt_torch.arrays import torch_to_numpy
from opt_torch.linear import Linear

# Parameter-name parts that belong to an adapter, never to the base model (PEFT's internal names).
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_dropout", "modules_to_save")


def is_adapter_name(name: str) -> bool:
    """Whether a `state_dict` / `named_parameters` name is an adapter's tensor rather than the base model's."""
    return any(part in ADAPTER_PARTS for part in name.split("."))


# ----- the layers


class LoraLinear(Linear):
    """An `nn.Linear` with LoRA pairs keyed by adapter name: `base(x) + scaling * B(A(dropout(x)))`; its base
    product is `opt_torch.linear.Linear`'s (packed while generate decodes on a CPU).

    Args:
        base: the Linear it replaces; its `weight` and `bias` parameters are taken over, not copied.
    """

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None  # None: the base layer alone (disabled, or not wrapped for it)
        self.merged_adapter: str | None = None

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        """Adds adapter `name`'s pair: A [r, in] and B [out, r], float32 (PEFT's autocast_adapter_dtype)."""
        self.lora_A[name] = _bias_free_linear(a)
        self.lora_B[name] = _bias_free_linear(b)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling

    def remove(self, name: str) -> None:
        for part in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in part:
                del part[name]
        self.scaling.pop(name, None)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own output (an int8 base overrides it: `opt_torch.quantization.LoraInt8Linear`)."""
        return Linear.forward(self, x)  # exactly the base layer's, so a disabled adapter is the base model

    def check_merge(self) -> None:
        """Raises when this layer cannot merge (an int8 base); called for every layer before any merges."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        name = self.active_adapter
        if name is None or name == self.merged_adapter:  # merged: the weight already holds the delta
            return out
        # The LoRA tensors stay float32 and are cast to the compute dtype here.
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        lora = F.linear(F.linear(self.lora_dropout[name](x), a), b)  # B T in -> B T r -> B T out
        return out + lora * self.scaling[name]

    def delta(self, name: str) -> torch.Tensor:
        """What merging adds to the weight: scaling * B @ A, in float32 ([out, in])."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.scaling[name] * (b @ a)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        self.weight.copy_((self.weight.float() + self.delta(name)).to(self.weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapter is not None:
            self.weight.copy_((self.weight.float() - self.delta(self.merged_adapter)).to(self.weight.dtype))
            self.merged_adapter = None

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's weight and bias (the adapters dropped)."""
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.lora_A)}"


def _bias_free_linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")  # called by weight, never packed
    linear.weight = nn.Parameter(weight)
    return linear


class WithCopies:
    """Mixed into the class of a module that an adapter's `modules_to_save` names (see `add_copies`): each adapter's
    copy is `modules_to_save[adapter]` and runs in the module's place while that adapter acts; the module's own
    parameters stay the base model's."""

    base_class: type[nn.Module]
    modules_to_save: nn.ModuleDict
    active_copy: str | None

    def forward(self, *args, **kwargs):
        if self.active_copy is not None:
            return self.modules_to_save[self.active_copy](*args, **kwargs)
        return super().forward(*args, **kwargs)


@functools.cache
def _class_with_copies(cls: type[nn.Module]) -> type[nn.Module]:
    # As torch.nn.utils.parametrize: a subclass made once per module class, so any module (Linear, LayerNorm,
    # Embedding) keeps its object, attribute names and parameters.
    return type(f"{cls.__name__}WithCopies", (WithCopies, cls), {"base_class": cls})


def add_copies(module: nn.Module) -> nn.Module:
    """Gives `module` an (empty) `modules_to_save` dict of per-adapter copies, in place; returns it."""
    if not isinstance(module, WithCopies):
        module.__class__ = _class_with_copies(type(module))
        module.modules_to_save = nn.ModuleDict()
        module.active_copy = None
    return module


def remove_copies(module: nn.Module) -> None:
    """Undoes `add_copies`: the module's own class, no copies."""
    if isinstance(module, WithCopies):
        del module.modules_to_save
        del module.active_copy
        module.__class__ = module.base_class


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the module as the base model has it (without other adapters' copies)."""
    clone = copy.deepcopy(module)
    remove_copies(clone)
    return clone


# ----- the model's side


@dataclasses.dataclass
class AdapterState:
    """A model's adapters and which one acts.

    Attributes:
        plans: {adapter name: its AdapterPlan}, in the order they were added.
        trainable: {adapter name: whether it trains when active} (add_adapter, or load_adapter(is_trainable=True)).
        active: the active adapter, or None.
        enabled: False after disable_adapters().
        merged: the adapter whose deltas the base weights hold now.
        bias_owner: the adapter whose trained biases the base biases hold now (None: the base's own).
        base_biases: {canonical name: the base's own value} of each bias some adapter trains.
        stashed_biases: {adapter: {canonical name: value}} its trained biases, current while it is not bias_owner.
        requires_grad: {parameter name: requires_grad} of the base before the first adapter froze it.
    """

    plans: dict[str, AdapterPlan] = dataclasses.field(default_factory=dict)
    trainable: dict[str, bool] = dataclasses.field(default_factory=dict)
    active: str | None = None
    enabled: bool = True
    merged: str | None = None
    bias_owner: str | None = None
    base_biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    stashed_biases: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    requires_grad: dict[str, bool] = dataclasses.field(default_factory=dict)

    @property
    def acting(self) -> str | None:
        """The adapter the forward applies: the active one unless the adapters are disabled."""
        return self.active if self.enabled else None


class LoraMixin(AdapterMethods):
    """LoRA adapters on a PyTorch OPT model, named as HF transformers' PEFT integration (`add_adapter`,
    `load_adapter`, `save_adapter` are `opt_core.adapters.AdapterMethods`'; `set_adapter`, ... are here). The host
    sets `self.adapter_state = AdapterState()` in its __init__ and has `config` and `head`."""

    adapter_state: AdapterState

    # ----- adding, loading, saving

    def adapter_arrays(self, adapter_name: str | None = None) -> tuple[AdapterPlan, dict[str, np.ndarray]]:
        """An adapter's plan and its tensors as canonical numpy arrays (`opt_core.adapters` names, torch layout):
        the LoRA pairs, modules_to_save copies and trained biases."""
        name = self._known(adapter_name or self.adapter_state.active)
        state = self.adapter_state
        params = self.adapter_parameters(name)
        if state.bias_owner != name:  # the base biases hold another's values (or the base's): this one's are kept
            params.update(state.stashed_biases[name])
        return state.plans[name], {key: torch_to_numpy(value) for key, value in params.items()}

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
        """{canonical adapter name (`opt_core.adapters`): parameter} of an adapter (default: the active one): its
        LoRA pairs (`{module}.lora_A.weight`, ...), its modules_to_save copies and the trained base biases (which
        hold its values while it acts)."""
        name = self._known(adapter_name or self.adapter_state.active)
        plan = self.adapter_state.plans[name]
        params = {}
        for slot in plan.slots.values():
            layer = self._submodule(slot.module)
            params[slot.a_name], params[slot.b_name] = layer.lora_A[name].weight, layer.lora_B[name].weight
        for canonical in plan.module_copies:
            module, leaf = canonical.rsplit(".", 1)
            params[canonical] = self._submodule(module).modules_to_save[name].get_parameter(leaf)
        for canonical in plan.trained_biases:
            params[canonical] = self._base_parameter(canonical)
        return params

    # ----- which adapter acts

    @property
    def active_adapter(self) -> str | None:
        return self.adapter_state.active

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return {name: plan.config for name, plan in self.adapter_state.plans.items()}

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the active adapter (unmerging another one first, as PEFT does); only it trains."""
        self._known(adapter_name)
        if self.adapter_state.merged not in (None, adapter_name):
            self.unmerge_adapter()
        self.adapter_state.active = adapter_name
        self._refresh()

    def disable_adapters(self) -> None:
        """Runs the base model alone (bit for bit) until `enable_adapters()`; unmerges a merged adapter first."""
        self._require_adapters()
        self.unmerge_adapter()
        self.adapter_state.enabled = False
        self._refresh()

    def enable_adapters(self) -> None:
        self._require_adapters()
        self.adapter_state.enabled = True
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter; the first remaining one becomes active if it was (PEFT's rule)."""
        state = self.adapter_state
        self._known(adapter_name)
        if state.merged == adapter_name:
            self.unmerge_adapter()
        if state.bias_owner == adapter_name:
            self._place_biases(None)
        self._remove_layers(adapter_name)
        del state.plans[adapter_name], state.trainable[adapter_name], state.stashed_biases[adapter_name]
        if not state.plans:
            self._reset()
            return
        if state.active == adapter_name:
            state.active = next(iter(state.plans))
        self._refresh()

    # ----- merging

    def merge_adapter(self) -> None:
        """Adds the active adapter's scaling * B @ A to the base weights in place (in float32, stored in the
        weights' dtype); the forward then skips its LoRA branch. Its modules_to_save copies keep acting."""
        state = self.adapter_state
        name = self._known(state.active)
        if not state.enabled:
            raise ValueError(f"cannot merge adapter {name!r}: the adapters are disabled (enable_adapters() first)")
        if state.merged == name:
            return
        layers = [layer for layer in self._lora_layers() if name in layer.lora_A]
        for layer in layers:
            layer.check_merge()
        for layer in layers:
            layer.merge(name)
        state.merged = name

    def unmerge_adapter(self) -> None:
        """Subtracts the merged adapter's deltas again (a no-op when none is merged)."""
        for layer in self._lora_layers():
            layer.unmerge()
        self.adapter_state.merged = None

    def merge_and_unload(self):
        """Merges the active adapter for good (its deltas, modules_to_save copies and trained biases become the
        base's), drops every adapter and returns the model: a plain model, whose save_pretrained writes the merged
        weights. The base parameters' requires_grad is as before the first adapter."""
        state = self.adapter_state
        name = self._known(state.active)
        self.enable_adapters()
        self.merge_adapter()
        with torch.no_grad():
            for canonical in state.plans[name].module_copies:
                module, leaf = canonical.rsplit(".", 1)
                self._base_parameter(canonical).copy_(self._submodule(module).modules_to_save[name].get_parameter(leaf))
        for layer in self._lora_layers():
            layer.merged_adapter = None  # its delta now belongs to the base weight
        for adapter in list(state.plans):
            self._remove_layers(adapter)
        state.bias_owner = None  # the active adapter's biases are kept in the base
        self._reset()
        return self

    # ----- counting

    def trainable_parameters(self) -> ParameterCount:
        """(trainable, total) as PEFT's get_nb_trainable_parameters: the total includes every adapter's LoRA
        tensors and modules_to_save copies; a tied weight counts once."""
        params = list(self.parameters())
        return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))

    # ----- internals

    def _attach_adapter(self, name: str, plan: AdapterPlan, tensors: dict[str, np.ndarray], trainable: bool) -> None:
        """Puts adapter `name` on the model with `tensors` (LoRA pairs; saved parameters where given, else the
        base's current values) and activates it."""
        if getattr(self, "is_dispatched", False):  # LoRA layers would wrap modules accelerate's hooks move
            raise ConfigError(f"adapters on a model dispatched by device_map={self.hf_device_map} are not supported")
        state = self.adapter_state
        if not state.plans:
            state.requires_grad = {n: p.requires_grad for n, p in self.named_parameters()}
        self.unmerge_adapter()
        self._place_biases(None)  # new copies and biases start from the base's own values
        device = next(self.parameters()).device
        for slot in plan.slots.values():
            a, b = (_float32(tensors[key], device) for key in (slot.a_name, slot.b_name))
            self._lora_layer(slot.module).add(name, a, b, slot.scaling, plan.config.lora_dropout)
        self._add_module_copies(name, plan, tensors)
        stash = {}
        for canonical in plan.trained_biases:
            base = state.base_biases.setdefault(canonical, self._base_parameter(canonical).detach().clone())
            value = _float32(tensors[canonical], base.device) if canonical in tensors else base
            stash[canonical] = value.to(base.dtype, copy=True)
        state.plans[name], state.trainable[name], state.stashed_biases[name] = plan, trainable, stash
        state.active, state.enabled = name, True
        self._refresh()

    def _add_module_copies(self, name: str, plan: AdapterPlan, tensors: dict[str, np.ndarray]) -> None:
        modules = dict.fromkeys(canonical.rsplit(".", 1)[0] for canonical in plan.module_copies)
        for module_name in modules:
            module = self._submodule(module_name)
            clone = plain_copy(module)
            add_copies(module).modules_to_save[name] = clone
        with torch.no_grad():
            for canonical in plan.module_copies:
                if canonical in tensors:
                    module, leaf = canonical.rsplit(".", 1)
                    param = self._submodule(module).modules_to_save[name].get_parameter(leaf)
                    param.copy_(_float32(tensors[canonical], param.device))

    def _remove_layers(self, name: str) -> None:
        """Drops adapter `name` from every layer; a layer left with no adapter is a plain module again."""
        for path, module in list(self.named_modules()):
            if isinstance(module, LoraLinear):
                module.remove(name)
                if not module.lora_A:
                    self._replace(path, module.to_linear())
            elif isinstance(module, WithCopies):
                if name in module.modules_to_save:
                    del module.modules_to_save[name]
                if not module.modules_to_save:
                    remove_copies(module)

    def _reset(self) -> None:
        """No adapters left: the base parameters' requires_grad as before the first one."""
        for name, param in self.named_parameters():
            param.requires_grad_(self.adapter_state.requires_grad.get(name, True))
        self.adapter_state = AdapterState()

    def _refresh(self) -> None:
        """Tells every layer which adapter acts, puts its trained biases in, and lets only it train (nothing
        trains while the adapters are disabled, as PEFT's disable_adapter_layers)."""
        state = self.adapter_state
        acting = state.acting
        for module in self.modules():
            if isinstance(module, LoraLinear):
                module.active_adapter = acting if acting is not None and acting in module.lora_A else None
            elif isinstance(module, WithCopies):
                module.active_copy = acting if acting is not None and acting in module.modules_to_save else None
        self._place_biases(acting)
        for param in self.parameters():
            param.requires_grad_(False)
        if acting is not None and state.trainable[acting]:  # disabled adapters are frozen too, as in PEFT
            for param in self.adapter_parameters(acting).values():
                param.requires_grad_(True)

    @torch.no_grad()
    def _place_biases(self, adapter: str | None) -> None:
        """Puts `adapter`'s trained biases into the base biases (None: the base's own), keeping the values of the
        adapter whose biases were there."""
        state = self.adapter_state
        if state.bias_owner == adapter:
            return
        if state.bias_owner is not None:
            stash = state.stashed_biases[state.bias_owner]
            for canonical in stash:
                param = self._base_parameter(canonical)
                stash[canonical] = param.detach().clone()
                param.copy_(state.base_biases[canonical])
        if adapter is not None:
            for canonical, value in state.stashed_biases[adapter].items():
                self._base_parameter(canonical).copy_(value)
        state.bias_owner = adapter

    def _lora_layer(self, module_name: str) -> LoraLinear:
        module = self._submodule(module_name)
        if not isinstance(module, LoraLinear):
            # An int8 layer (`opt_torch.quantization.Int8Linear`) names its own LoRA wrapper.
            module = module.lora_wrapper() if hasattr(module, "lora_wrapper") else LoraLinear(module)
            self._replace(module_path(module_name, self.head), module)
        return module

    def _lora_layers(self) -> list[LoraLinear]:
        return [module for module in self.modules() if isinstance(module, LoraLinear)]

    def _replace(self, path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(self.get_submodule(parent), leaf, module)

    def _submodule(self, canonical_module: str) -> nn.Module:
        return self.get_submodule(module_path(canonical_module, self.head))

    def _base_parameter(self, canonical: str) -> nn.Parameter:
        return self.get_parameter(module_path(canonical, self.head))

    def _check_new_adapter_name(self, adapter_name: str) -> None:
        super()._check_new_adapter_name(adapter_name)
        if "." in adapter_name:  # it names torch submodules (lora_A[adapter_name])
            raise ValueError(f"an adapter name cannot contain dots, got {adapter_name!r}")

    def _known(self, name: str | None) -> str:
        if name is None:
            self._require_adapters()
            raise ValueError("no adapter is active: set_adapter(name) first")
        if name not in self.adapter_state.plans:
            raise ValueError(f"no adapter named {name!r}; the model has {list(self.adapter_state.plans) or 'none'}")
        return name

    def _require_adapters(self) -> None:
        if not self.adapter_state.plans:
            raise ValueError("the model has no adapter: add_adapter() or load_adapter() first")


def _float32(array: Any, device) -> torch.Tensor:
    """A new float32 tensor from a (possibly read-only, memory-mapped, bfloat16) array."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).to(device)
