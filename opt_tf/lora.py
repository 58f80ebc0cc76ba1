"""LoRA adapters (HF PEFT's files) for the Keras models: the per-layer weights, how a layer applies them, and the
PEFT-named model methods (`add_adapter`, `load_adapter`, `save_adapter`, `set_adapter`, `merge_adapter`, ...).

Siblings: `opt_torch/lora.py`, `opt_flax/lora.py`; which modules an adapter wraps, its file names, initial values
and merge delta are framework-free (`opt_core.adapters`).

Where adapters live (keras-hub's `enable_lora` idiom): an adapter's tensors are Keras variables on the layer they
adapt, in an `AdapterWeights` sublayer per adapter: a wrapped dense layer gets the LoRA pair, A [in, r] and B [r, out]
(the transposes of PEFT's lora_A [r, in] / lora_B [out, r]), float32 whatever the model's dtype (as PEFT's
autocast_adapter_dtype); a `modules_to_save` layer gets the adapter's own copy of each of its variables. Adding an
adapter freezes the base variables (`variable.trainable = False`), so `model.trainable_weights` lists exactly the
active adapter's tensors (and the biases it trains) and `fit` / `train_on_batch` train only them. Compile the model
after adding or loading an adapter, as after any change of what is trainable. The base variables keep their names
and their canonical mapping: `canonical_state`, `save_pretrained` and the weight files never see an adapter.

A layer applies the active adapter when the model's adapters are enabled: `OPTDense` adds
`scaling * B(A(dropout(x)))` to its own output (unless the adapter is merged into its kernel) and computes with the
adapter's copy of its variables when it has one; other layers (layer norms, embeddings in `modules_to_save`) read
the copies through a wrapper of their `call`. With adapters disabled every layer runs its plain code on the base
variables, so the outputs are the base model's bit for bit.

Biases an adapter trains (bias="all" / "lora_only") are the base bias variables themselves, as in PEFT, but the
model keeps the base's own values and each adapter's apart and puts the acting adapter's in (as opt_torch and
opt_flax): disabling or deleting adapters gives the base model back bit for bit, and two adapters with trained
biases do not overwrite each other (PEFT's disabled model would keep the last trained biases).

The adapter state is Python state, read when a function is traced: every change (add, load, set, enable, disable,
merge, unmerge, delete) drops Keras' compiled train / test / predict functions, and `generate` keys its compiled
programs by `trace_key` and refreshes its decode-time kernels (`opt_tf.decode_layout`) from the effective weights
(`effective_kernel_and_bias`) before every call, so neither ever runs a stale adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core.adapters import (  # noqa: E402
    AdapterMethods,
    AdapterPlan,
    LoraConfig,
    LoraSlot,
    ParameterCount,
    lora_delta,
)
from opt_core.weights import LEAF_RULES, kind_of, to_style_layout  # noqa: E402

_SERIALS = itertools.count()  # tells a re-added adapter of the same name from the one compiled programs captured


# ----- one adapter's tensors on one layer


class AdapterWeights(keras.layers.Layer):
    """One adapter's variables on one layer: the LoRA pair of a wrapped dense layer (A [in, r], B [r, out], float32)
    and its dropout, and / or the adapter's copies of a `modules_to_save` layer's variables.

    Args:
        adapter_name: the adapter's name (this layer's name).
        slot: the wrapped module's rank, sizes and scaling; None for a module the adapter only copies.
        dropout: lora_dropout, applied to the LoRA branch's input when training.
        copies: {the layer's attribute holding a variable (e.g. "_kernel", "bias", "gamma"): that variable}, to copy.
        **kwargs: Keras layer arguments (`dtype`: the adapted layer's policy).
    """

    def __init__(self, adapter_name: str, slot: LoraSlot | None, dropout: float, copies: Mapping, **kwargs):
        super().__init__(name=adapter_name, **kwargs)
        self.scaling = slot.scaling if slot is not None else None
        self.lora_A = self.lora_B = self.dropout = None
        if slot is not None:
            self.lora_A = self._variable("lora_A", (slot.in_features, slot.r), "float32")
            self.lora_B = self._variable("lora_B", (slot.r, slot.out_features), "float32")
            if dropout > 0:
                self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.copies = {attr: self._variable(attr.lstrip("_"), v.shape, v.dtype, v.value) for attr, v in copies.items()}
        self.built = True

    def _variable(self, name: str, shape, dtype, value=None) -> keras.Variable:
        variable = self.add_weight(shape=tuple(shape), initializer="zeros", dtype=dtype, name=name)
        if value is not None:
            variable.assign(tf.cast(value, variable.dtype))
        return variable

    @property
    def tensors(self) -> list[keras.Variable]:
        pair = [self.lora_A, self.lora_B] if self.lora_A is not None else []
        return pair + list(self.copies.values())

    def delta(self) -> np.ndarray:
        """scaling * A @ B in the Keras layout [in, out], float32: `opt_core.adapters.lora_delta`'s numbers."""
        return lora_delta(self.lora_A.numpy().T, self.lora_B.numpy().T, self.scaling).T

    @contextlib.contextmanager
    def in_place(self, layer: keras.layers.Layer):
        """The layer reads this adapter's copies of its variables for the duration (a call, or its trace)."""
        originals = {attr: getattr(layer, attr) for attr in self.copies}
        try:
            for attr, copy in self.copies.items():
                object.__setattr__(layer, attr, copy)  # not Keras' setattr: the copy must not be tracked twice
            yield
        finally:
            for attr, original in originals.items():
                object.__setattr__(layer, attr, original)


class _LayerAdapters:
    """What a layer knows of the adapters: the model's adapter state and its own `AdapterWeights` by adapter."""

    def __init__(self, state: _LoraState):
        self.state = state
        self.weights: dict[str, AdapterWeights] = {}

    def active(self) -> AdapterWeights | None:
        state = self.state
        return self.weights.get(state.active) if state.enabled and state.active is not None else None


def active_weights(layer: keras.layers.Layer) -> AdapterWeights | None:
    """The layer's weights of the model's active adapter, or None (no adapter here, none active, or disabled)."""
    adapters = layer.__dict__.get("_lora")
    return adapters.active() if adapters is not None else None


def adapted_dense_call(layer, weights: AdapterWeights, base_call, inputs, training):
    """A wrapped dense layer: base(x) + scaling * B(A(dropout(x))); base(x) with the adapter's copy of the layer's
    variables when it saves the module whole. A merged adapter is in the kernel already: no branch."""
    with weights.in_place(layer):
        outputs = base_call(inputs)
    if weights.lora_A is None or layer._lora.state.merged is not None:
        return outputs
    x = weights.dropout(inputs, training=training) if weights.dropout is not None else inputs
    # The float32 LoRA tensors are cast to the compute dtype (Keras' autocast does the same under a mixed policy).
    a, b = tf.cast(weights.lora_A, inputs.dtype), tf.cast(weights.lora_B, inputs.dtype)
    return outputs + keras.ops.matmul(keras.ops.matmul(x, a), b) * weights.scaling  # B T in -> B T r -> B T out


def effective_kernel_and_bias(layer) -> tuple[Any, Any]:
    """The [in, out] kernel and the bias a dense layer's call computes with: its own, its active adapter's copies,
    or with an unmerged LoRA pair the kernel merge_adapter would give (the decode layout is built from these)."""
    weights = active_weights(layer)
    if weights is None:
        return layer.kernel, layer.bias
    kernel = weights.copies.get("_kernel", layer.kernel)
    bias = weights.copies.get("bias", layer.bias)
    if weights.lora_A is not None and layer._lora.state.merged is None:
        kernel = tf.constant(_plus(kernel, weights.delta()))
    return kernel, bias


def _plus(variable, delta: np.ndarray) -> np.ndarray:
    """variable + delta, summed in float32 and stored in the variable's dtype (as merging into a bf16 base)."""
    dtype = tf.as_dtype(variable.dtype).as_numpy_dtype
    return (np.asarray(variable.numpy(), np.float32) + delta).astype(dtype)


def _storage(layer: keras.layers.Layer, canonical: str) -> str:
    """The layer attribute holding a canonical parameter's variable."""
    leaf = LEAF_RULES["keras"].leaves[kind_of(canonical)]
    # Keras' `kernel` and `embeddings` are properties over `_kernel` / `_embeddings`; gamma, beta, bias are plain.
    return f"_{leaf}" if isinstance(getattr(type(layer), leaf, None), property) else leaf


def _route_call(layer: keras.layers.Layer) -> None:
    """Makes a Keras layer that is not an `OPTDense` (a norm, an embedding) read its active adapter's copies."""
    original = layer.call

    @functools.wraps(original)  # Keras reads the signature (training and the like) through __wrapped__
    def call(*args, **kwargs):
        weights = active_weights(layer)
        if weights is None:
            return original(*args, **kwargs)
        with weights.in_place(layer):
            return original(*args, **kwargs)

    object.__setattr__(layer, "call", call)


def _attach(layer: keras.layers.Layer, state: _LoraState, name: str, weights: AdapterWeights) -> None:
    adapters = layer.__dict__.get("_lora")
    if adapters is None:
        adapters = _LayerAdapters(state)
        object.__setattr__(layer, "_lora", adapters)
        if not getattr(layer, "applies_adapters", False):
            _route_call(layer)
    with _unlocked(layer):
        layer._tracker.add_to_store("layers", weights)  # a sublayer: its variables are the model's
    adapters.weights[name] = weights


def _detach(layer: keras.layers.Layer, name: str) -> None:
    adapters = layer.__dict__["_lora"]
    with _unlocked(layer):
        layer._tracker.untrack(adapters.weights.pop(name))
    if not adapters.weights:
        object.__delattr__(layer, "_lora")
        layer.__dict__.pop("call", None)  # the wrapper of `_route_call`, if any


@contextlib.contextmanager
def _scope(path: str):
    with contextlib.ExitStack() as stack:
        for part in path.split("/"):
            stack.enter_context(keras.name_scope(part))
        yield


@contextlib.contextmanager
def _unlocked(layer: keras.layers.Layer):
    # Keras locks a built layer's state; adding an adapter is the one change after build (as Dense.enable_lora).
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


# ----- the model's adapter state


@dataclasses.dataclass
class _Adapter:
    plan: AdapterPlan
    trainable: bool
    serial: int
    layers: dict[str, keras.layers.Layer]  # canonical module -> its layer

    def weights(self, name: str):
        """(canonical module, layer, its AdapterWeights) of every module this adapter adapts."""
        return [(module, layer, layer._lora.weights[name]) for module, layer in self.layers.items()]


@dataclasses.dataclass
class _LoraState:
    """A model's adapters and which one acts.

    Attributes:
        adapters: {name: adapter}, in the order they were added.
        active: the active adapter, or None; it acts unless the adapters are disabled (`enabled` False).
        merged: the adapter merged into the base kernels (always the active one).
        bias_owner: the adapter whose trained biases the base bias variables hold now (None: the base's own).
        base_biases: {canonical name: the base's own value} of each bias some adapter trains.
        stashed_biases: {adapter: {canonical name: value}} its trained biases, current while it is not bias_owner.
        base_trainable: (variable, trainable) of every base variable before the first adapter froze it.
    """

    adapters: dict[str, _Adapter] = dataclasses.field(default_factory=dict)
    active: str | None = None
    enabled: bool = True
    merged: str | None = None
    bias_owner: str | None = None
    base_biases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    stashed_biases: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    base_trainable: list[tuple[keras.Variable, bool]] = dataclasses.field(default_factory=list)

    @property
    def acting(self) -> str | None:
        return self.active if self.enabled else None


def trace_key(model) -> tuple | None:
    """What a traced function depends on of the adapter state: which adapter is applied, and how."""
    state = model._lora
    if state is None:
        return None
    active = state.adapters.get(state.active)
    return (active.serial if active is not None else None, state.enabled, state.merged is not None)


# ----- the model methods, named as HF transformers' PEFT integration


class LoraMixin(AdapterMethods):
    """LoRA adapters in PEFT's format for `PreTrainedOPT` (which supplies `config`, `head`, `keras_layer`,
    `keras_variable`); `add_adapter`, `load_adapter`, `save_adapter` are `opt_core.adapters.AdapterMethods`'."""

    _lora: _LoraState | None = None

    def adapter_plan(self, adapter_name: str | None = None) -> AdapterPlan:
        """An adapter's plan (default: the active one's): the modules it wraps and the parameters it saves."""
        return self._adapter(self._name_or_active(adapter_name)).plan

    def adapter_arrays(self, adapter_name: str | None = None) -> tuple[AdapterPlan, dict[str, np.ndarray]]:
        """An adapter's plan and its tensors as canonical numpy arrays (`opt_core.adapters` names, torch layout):
        the LoRA pairs, modules_to_save copies and trained biases."""
        name = self._name_or_active(adapter_name)
        adapter = self._adapter(name)
        tensors = {}
        for module, _, weights in adapter.weights(name):
            slot = adapter.plan.slots.get(module)
            if slot is not None:
                tensors[slot.a_name] = np.ascontiguousarray(weights.lora_A.numpy().T)  # in r -> [r, in]
                tensors[slot.b_name] = np.ascontiguousarray(weights.lora_B.numpy().T)  # r out -> [out, r]
        for canonical in adapter.plan.module_copies:
            value = self._copy_variable(name, canonical).numpy()
            tensors[canonical] = np.ascontiguousarray(to_style_layout(value, kind_of(canonical), "keras"))
        for canonical in adapter.plan.trained_biases:
            tensors[canonical] = self._trained_bias(name, canonical)
        return adapter.plan, tensors

    def adapter_variables(self, adapter_name: str | None = None) -> dict[str, keras.Variable]:
        """{canonical adapter name: variable} of an adapter (default: the active one), what training updates: its
        LoRA pairs (`{module}.lora_A.weight`, Keras layout [in, r]), its modules_to_save copies (under the names of
        the parameters they stand for) and the trained base biases (which hold its values while it acts)."""
        name = self._name_or_active(adapter_name)
        adapter = self._adapter(name)
        variables = {}
        for module, _, weights in adapter.weights(name):
            slot = adapter.plan.slots.get(module)
            if slot is not None:
                variables[slot.a_name], variables[slot.b_name] = weights.lora_A, weights.lora_B
        for canonical in adapter.plan.module_copies:
            variables[canonical] = self._copy_variable(name, canonical)
        for canonical in adapter.plan.trained_biases:
            variables[canonical] = self.keras_variable(canonical, kind_of(canonical))
        return variables

    def assign_adapter_arrays(self, tensors: Mapping[str, np.ndarray], adapter_name: str | None = None) -> None:
        """Sets an adapter's tensors (default: the active one's) from canonical arrays, as `adapter_arrays` gives
        them (e.g. a training checkpoint's, read back)."""
        name = self._name_or_active(adapter_name)
        self._assign_adapter(name, tensors)
        self._set_trained_biases(name, tensors)

    # ----- which adapter runs

    @property
    def active_adapter(self) -> str | None:
        return self._lora.active if self._lora is not None else None

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return {name: a.plan.config for name, a in self._lora.adapters.items()} if self._lora is not None else {}

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the active adapter (the others stay loaded, frozen)."""
        self._adapter(adapter_name)
        self._unmerge_before_switching(adapter_name)
        self._lora.active = adapter_name
        self._adapters_changed()

    def disable_adapters(self) -> None:
        """Runs the base model: no LoRA branch, no modules_to_save copy (a merged adapter is unmerged first, as
        PEFT does when a merged layer runs disabled); nothing of the adapters trains."""
        self._require_adapters()
        self.unmerge_adapter()
        self._lora.enabled = False
        self._adapters_changed()

    def enable_adapters(self) -> None:
        self._require_adapters()
        self._lora.enabled = True
        self._adapters_changed()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter and its variables. Deleting the active one activates the first that remains, as
        PEFT; deleting the last gives the plain model back (its variables trainable as before)."""
        adapter = self._adapter(adapter_name)
        state = self._lora
        if state.merged == adapter_name:
            self.unmerge_adapter()
        if state.bias_owner == adapter_name:
            self._place_biases(None)
        for layer in adapter.layers.values():
            _detach(layer, adapter_name)
        del state.adapters[adapter_name], state.stashed_biases[adapter_name]
        if state.active == adapter_name:
            state.active = next(iter(state.adapters), None)
        self._adapters_changed()

    # ----- merging

    def merge_adapter(self) -> None:
        """Adds scaling * B @ A of the active adapter to the base kernels in place (in float32, stored in the
        kernels' dtype); the layers then skip the LoRA branch. Merging a merged adapter does nothing."""
        state = self._require_adapters()
        if state.active is None:
            raise ValueError("merge_adapter: this model has no active adapter")
        if not state.enabled:
            raise ValueError(f"cannot merge adapter {state.active!r}: the adapters are disabled (enable_adapters())")
        if state.merged is not None:
            return
        for _, layer, weights in self._adapter(state.active).weights(state.active):
            if weights.lora_A is not None:
                layer.kernel.assign(_plus(layer.kernel, weights.delta()))
        state.merged = state.active
        self._adapters_changed()

    def unmerge_adapter(self) -> None:
        """Subtracts the merged adapter's delta from the base kernels again (nothing when none is merged)."""
        state = self._require_adapters()
        if state.merged is None:
            return
        for _, layer, weights in self._adapter(state.merged).weights(state.merged):
            if weights.lora_A is not None:
                layer.kernel.assign(_plus(layer.kernel, -weights.delta()))
        state.merged = None
        self._adapters_changed()

    def merge_and_unload(self):
        """Merges the active adapter for good (its deltas, modules_to_save copies and trained biases become the
        base's), drops every adapter and returns the model: a plain one, whose save_pretrained writes the merged
        weights; its variables are trainable as before the first adapter."""
        state = self._lora
        if state is None:
            return self
        if state.active is not None:
            self.enable_adapters()
            self.merge_adapter()
            for _, layer, weights in self._adapter(state.active).weights(state.active):
                for attr, copy in weights.copies.items():
                    getattr(layer, attr).assign(copy)
        state.merged = None  # the deltas now belong to the base
        state.bias_owner = None  # and so do the active adapter's trained biases
        for name in list(state.adapters):
            self.delete_adapter(name)
        return self

    # ----- counting

    def trainable_parameters(self) -> ParameterCount:
        """(trainable, total) as PEFT's get_nb_trainable_parameters: the total counts the base, every adapter's
        LoRA tensors and its modules_to_save copies."""
        size = lambda variables: sum(int(np.prod(v.shape)) for v in variables)  # noqa: E731
        return ParameterCount(size(self.trainable_weights), size(self.weights))

    # ----- internals

    def _require_adapters(self) -> _LoraState:
        if self._lora is None:
            raise ValueError("this model has no adapter: add_adapter or load_adapter first")
        return self._lora

    def _name_or_active(self, adapter_name: str | None) -> str:
        name = adapter_name if adapter_name is not None else self.active_adapter
        if name is None:
            raise ValueError("this model has no active adapter: name one, or add_adapter / load_adapter first")
        return name

    def _adapter(self, adapter_name: str) -> _Adapter:
        state = self._require_adapters()
        if adapter_name not in state.adapters:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(state.adapters)}")
        return state.adapters[adapter_name]

    def _unmerge_before_switching(self, adapter_name: str) -> None:
        # PEFT: an adapter cannot be set while another is merged; it unmerges first.
        if self._lora is not None and self._lora.merged not in (None, adapter_name):
            self.unmerge_adapter()

    def _attach_adapter(self, name: str, plan: AdapterPlan, tensors: Mapping[str, np.ndarray], trainable: bool):
        """Creates the adapter's variables on its layers, assigns them from canonical `tensors` (the LoRA pairs,
        and the modules_to_save copies the tensors hold) and activates the adapter."""
        if self._lora is None:
            self._lora = _LoraState(base_trainable=[(v, v.trainable) for v in self.weights])
        self._unmerge_before_switching(name)
        self._place_biases(None)  # new copies and biases start from the base's own values
        self._stash_trained_biases(name, plan, tensors)
        adapter = _Adapter(plan, trainable, next(_SERIALS), {})
        for module in [*plan.slots, *_copied_modules(plan)]:
            layer = self.keras_layer(module)
            # PEFT copies a modules_to_save layer as it is now.
            copies = {
                _storage(layer, c): getattr(layer, _storage(layer, c))
                for c in plan.module_copies
                if c.rsplit(".", 1)[0] == module
            }
            dropout = plan.config.lora_dropout
            with _scope(layer.path):  # the variables' paths: `{layer path}/{adapter}/lora_A`
                weights = AdapterWeights(name, plan.slots.get(module), dropout, copies, dtype=layer.dtype_policy)
            _attach(layer, self._lora, name, weights)
            adapter.layers[module] = layer
        self._lora.adapters[name] = adapter
        self._assign_adapter(name, tensors)
        self._lora.active, self._lora.enabled = name, True
        self._adapters_changed()

    def _assign_adapter(self, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Assigns canonical tensors (torch layout) to adapter `name`'s LoRA pairs and to the copies they hold."""
        adapter = self._adapter(name)
        for module, _, weights in adapter.weights(name):
            slot = adapter.plan.slots.get(module)
            if slot is not None:
                weights.lora_A.assign(np.asarray(tensors[slot.a_name], np.float32).T)  # [r, in] -> in r
                weights.lora_B.assign(np.asarray(tensors[slot.b_name], np.float32).T)  # [out, r] -> r out
        for canonical in adapter.plan.module_copies:
            if canonical in tensors:
                variable = self._copy_variable(name, canonical)
                value = to_style_layout(np.asarray(tensors[canonical]), kind_of(canonical), "keras")
                variable.assign(tf.cast(value, variable.dtype))

    def _stash_trained_biases(self, name: str, plan: AdapterPlan, tensors: Mapping[str, np.ndarray]) -> None:
        """Adapter `name`'s trained biases: the file's values, else the base's own (the base variables hold
        those now)."""
        state, stash = self._lora, {}
        for canonical in plan.trained_biases:
            variable = self.keras_variable(canonical, kind_of(canonical))
            base = state.base_biases.setdefault(canonical, variable.numpy())
            value = np.asarray(tensors[canonical]) if canonical in tensors else base
            stash[canonical] = value.astype(base.dtype)
        state.stashed_biases[name] = stash

    def _place_biases(self, adapter: str | None) -> None:
        """Puts `adapter`'s trained biases into the base bias variables (None: the base's own), keeping the
        values of the adapter whose biases were there."""
        state = self._lora
        if state.bias_owner == adapter:
            return
        if state.bias_owner is not None:
            stash = state.stashed_biases[state.bias_owner]
            for canonical in stash:
                variable = self.keras_variable(canonical, kind_of(canonical))
                stash[canonical] = variable.numpy()
                variable.assign(state.base_biases[canonical])
        for canonical, value in (state.stashed_biases[adapter] if adapter is not None else {}).items():
            self.keras_variable(canonical, kind_of(canonical)).assign(value)
        state.bias_owner = adapter

    def _trained_bias(self, name: str, canonical: str) -> np.ndarray:
        """Adapter `name`'s value of a bias it trains: the base variable's while it acts, else its stash."""
        if self._lora.bias_owner == name:
            return self.keras_variable(canonical, kind_of(canonical)).numpy()
        return self._lora.stashed_biases[name][canonical]

    def _set_trained_biases(self, name: str, tensors: Mapping[str, np.ndarray]) -> None:
        for canonical in self._adapter(name).plan.trained_biases:
            stash = self._lora.stashed_biases[name]
            stash[canonical] = np.asarray(tensors[canonical]).astype(stash[canonical].dtype)
            if self._lora.bias_owner == name:
                self.keras_variable(canonical, kind_of(canonical)).assign(stash[canonical])

    def _copy_variable(self, name: str, canonical: str) -> keras.Variable:
        """Adapter `name`'s copy of a modules_to_save parameter."""
        layer = self._adapter(name).layers[canonical.rsplit(".", 1)[0]]
        return layer._lora.weights[name].copies[_storage(layer, canonical)]

    def _adapters_changed(self) -> None:
        """After any change of the adapter state: the acting adapter's trained biases in place, what trains, and
        no compiled Keras function that ran another state."""
        state = self._lora
        self._place_biases(state.acting)
        for variable, _ in state.base_trainable:
            variable.trainable = False
        # As PEFT: only the active adapter trains, and nothing of the adapters while they are disabled.
        active = state.adapters.get(state.acting)
        for name, adapter in state.adapters.items():
            on = adapter is active and adapter.trainable
            for _, _, weights in adapter.weights(name):
                for variable in weights.tensors:
                    variable.trainable = on
        if active is not None and active.trainable:
            for name in active.plan.trained_biases:
                self.keras_variable(name, kind_of(name)).trainable = True
        if not state.adapters:  # the plain model again
            for variable, trainable in state.base_trainable:
                variable.trainable = trainable
            self._lora = None
        self.train_function = self.test_function = self.predict_function = None


def _copied_modules(plan: AdapterPlan) -> list[str]:
    return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in plan.module_copies))
