"""LoRA adapters in HF PEFT's files: `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).

An adapter is another file layout of the parameter table (`opt_core.weights`), not a second naming system. PEFT
names a tensor by the HF module path of the model class it was trained on, behind `base_model.model.`:

    base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight    [r, in]   (torch layout)
    base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight    [out, r]
    base_model.model.score.weight                                              a `modules_to_save` copy
    base_model.model.model.decoder.layers.0.self_attn.q_proj.base_layer.bias   a bias trained with `bias="lora_only"`

(a bare OPTModel has no `model.` level: `base_model.model.decoder.layers...`). Inside this library an adapter's
tensors are keyed by canonical names: `{module}.lora_A.weight`, `{module}.lora_B.weight` with `{module}` the
canonical module (`model.decoder.layers.0.self_attn.q_proj`), and canonical parameter names for the tensors the
adapter carries whole (modules_to_save, trained biases). Each framework maps those to its own layout as it does
weights. A LoRA module computes `base(x) + scaling * B(A(dropout(x)))`, `scaling = alpha / r` (`alpha / sqrt(r)`
with rsLoRA); merging adds `scaling * B @ A` to the base weight.

Which modules an adapter wraps, their rank and alpha, follow PEFT's matching rules exactly (`plan_adapter`), so one
`adapter_config.json` selects the same modules here and in PEFT. Reading never runs code: `.bin` goes through the
restricted unpickler of `opt_core.torch_pickle`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from opt_core.config import OPTConfig
from opt_core.dtypes import to_numpy_dtype
from opt_core.errors import CheckpointError, ConfigError
from opt_core.files import FolderCommit, complete_interrupted_save
from opt_core.hub import resolve_file
from opt_core.safetensors_file import read_safetensors, write_safetensors
from opt_core.tokenizer import TOKENIZER_FILES
from opt_core.torch_pickle import load_state_dict, save_state_dict
from opt_core.weights import DENSE_BIAS, DENSE_WEIGHT, NORM_BIAS, module_path, parameter_specs

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# PEFT's default targets for OPT (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["opt"]).
DEFAULT_TARGET_MODULES = ["q_proj", "v_proj"]
ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
FRESH_INITS = (True, False, "gaussian")

# PEFT's task types for our heads, and the head modules PEFT adds to `modules_to_save` for a task.
TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "sequence_classification": "SEQ_CLS",
    "question_answering": "QUESTION_ANS",
    "base": "FEATURE_EXTRACTION",
}
TASK_HEAD_MODULES = {"SEQ_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
HEAD_OF_TASK_TYPE = {task_type: head for head, task_type in TASK_TYPES.items()}

# Keys PEFT writes whose non-default values change what the adapter computes in ways this library does not
# implement; an adapter using them is refused by name rather than run wrongly.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "megatron_config": (None,),
}


@dataclasses.dataclass
class LoraConfig:
    """PEFT's LoRA settings; `adapter_config.json` keys. Keys this class has no field for are kept in `extra`
    and written back unchanged.

    Args:
        r: the rank of every LoRA pair, unless `rank_pattern` names another for a module.
        lora_alpha: the numerator of the scaling (`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`).
        lora_dropout: dropout on the LoRA branch's input during training.
        target_modules: module names (a module matches when its path ends with `.name`), one regex matched
            against the whole path, or "all-linear" (every dense layer but the output head); default q_proj,v_proj.
        exclude_modules: names or a regex of modules never wrapped.
        bias: "none", "all" (every bias trains and is saved) or "lora_only" (the wrapped modules' biases).
        modules_to_save: modules trained whole and saved in the adapter (e.g. "score", "qa_outputs").
        use_rslora: rank-stabilised scaling `alpha / sqrt(r)`.
        rank_pattern, alpha_pattern: {module-path suffix or regex: rank / alpha} overriding r / lora_alpha.
        init_lora_weights: True (A Kaiming-uniform, B zero: the adapter starts as a no-op), "gaussian" (A normal
            with std 1/r, B zero) or False (both random, for tests).
        layers_to_transform, layers_pattern: wrap only these layer indices.
        task_type: "CAUSAL_LM", "SEQ_CLS", "QUESTION_ANS" or "FEATURE_EXTRACTION".
        base_model_name_or_path: the base model the adapter was trained on.
        inference_mode: whether PEFT loads it frozen.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"LoRA config field {field!r} must be {what}, got {getattr(self, field)!r}")

        need(_is_int(self.r) and self.r > 0, "r", "a positive integer")
        need(_is_real(self.lora_alpha), "lora_alpha", "a number")
        need(_is_real(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        need(self.bias in BIAS_MODES, "bias", f"one of {BIAS_MODES}")
        for field in ("target_modules", "exclude_modules", "layers_pattern"):
            need(_names_or_regex(getattr(self, field)), field, "a list of module names, a regex string or null")
        need(_names_or_regex(self.modules_to_save, allow_str=False), "modules_to_save", "a list of names or null")
        need(isinstance(self.use_rslora, bool), "use_rslora", "true or false")
        need(_pattern(self.rank_pattern, lambda v: _is_int(v) and v > 0), "rank_pattern", "{pattern: rank > 0}")
        need(_pattern(self.alpha_pattern, _is_real), "alpha_pattern", "{pattern: number}")
        layers = self.layers_to_transform
        need(
            layers is None or _is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers))),
            "layers_to_transform",
            "a layer index, a list of them or null",
        )
        need(self.task_type is None or isinstance(self.task_type, str), "task_type", "a string or null")
        peft_type = self.extra.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"adapter type {peft_type!r} is not supported: this library implements LoRA only")
        for key, defaults in _UNSUPPORTED.items():
            if key in self.extra and self.extra[key] not in defaults:
                raise ConfigError(f"LoRA config sets {key}={self.extra[key]!r}, which this library does not support")

    # ----- files

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "adapter config") -> LoraConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if known.get("rank_pattern") is None:
            known["rank_pattern"] = {}
        if known.get("alpha_pattern") is None:
            known["alpha_pattern"] = {}
        try:
            return cls(**known, extra=extra)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"peft_type": "LORA", **self.extra, **values}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LoraConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no adapter config at {path}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise ConfigError(f"{path} is not valid JSON: {type(error).__name__} {error}"[:300]) from None
        return cls.from_dict(data, str(path))

    def for_head(self, head: str) -> LoraConfig:
        """The config PEFT would use on a model with `head`: the task type filled in from the head, and the head
        module added to `modules_to_save` for classification and QA, as PEFT's task wrappers do."""
        task_type = self.task_type or TASK_TYPES[head]
        modules = list(self.modules_to_save or [])
        for name in TASK_HEAD_MODULES.get(task_type, []):
            if name not in modules:
                modules.append(name)
        return dataclasses.replace(self, task_type=task_type, modules_to_save=modules or None)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _names_or_regex(value: Any, allow_str: bool = True) -> bool:
    if value is None or (allow_str and isinstance(value, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _pattern(value: Any, ok) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and ok(v) for k, v in value.items())


# ----- which modules an adapter wraps (PEFT's rules)


@dataclasses.dataclass(frozen=True)
class LoraSlot:
    """One wrapped dense module: canonical module name, its torch-layout sizes, rank, alpha and scaling."""

    module: str
    in_features: int
    out_features: int
    r: int
    alpha: float
    scaling: float

    @property
    def a_name(self) -> str:
        return f"{self.module}.lora_A.weight"

    @property
    def b_name(self) -> str:
        return f"{self.module}.lora_B.weight"


@dataclasses.dataclass
class AdapterPlan:
    """What one adapter is on one model: the wrapped modules and the base parameters it carries whole.

    Attributes:
        config: the LoRA config, with the head's task type and modules_to_save filled in (`LoraConfig.for_head`).
        head: the model's head ("causal_lm", ...).
        slots: {canonical module: LoraSlot}, in table order.
        saved: {canonical parameter name: PEFT file name} of the modules_to_save parameters and trained biases.
        module_copies: the canonical parameters of modules_to_save (the adapter holds its own copy of them; the
            base keeps the originals, so disabling the adapter gives the base model back).
        saved_shapes: {canonical parameter name: torch-layout shape} of the saved parameters.
    """

    config: LoraConfig
    head: str
    slots: dict[str, LoraSlot]
    saved: dict[str, str]
    module_copies: list[str]
    saved_shapes: dict[str, tuple[int, ...]]

    @property
    def trained_biases(self) -> list[str]:
        """Base biases the adapter trains in place (bias="all" or "lora_only"), as PEFT does."""
        return [name for name in self.saved if name not in self.module_copies]

    def file_name(self, canonical: str) -> str:
        """The PEFT file name of a LoRA tensor or a saved parameter."""
        if canonical in self.saved:
            return self.saved[canonical]
        return PEFT_PREFIX + module_path(canonical, self.head)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{canonical name: torch-layout shape} of every LoRA tensor (not the saved parameters)."""
        out = {}
        for slot in self.slots.values():
            out[slot.a_name] = (slot.r, slot.in_features)
            out[slot.b_name] = (slot.out_features, slot.r)
        return out

    def num_lora_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes().values())


def plan_adapter(lora_config: LoraConfig, config: OPTConfig, head: str) -> AdapterPlan:
    """The modules `lora_config` wraps on a model of `head`, with their ranks, alphas and scalings, matched by
    PEFT's rules against HF's module paths for that model class (so a regex means the same here and in PEFT)."""
    lora_config = lora_config.for_head(head)
    specs = parameter_specs(config, head)
    modules = _modules(specs)
    dense = {m for m, s in modules.items() if s[0].kind == DENSE_WEIGHT}
    if head == "causal_lm" and config.tie_word_embeddings:
        modules["lm_head"] = []  # HF's tied lm_head is a Linear sharing embed_tokens' weight
    keys = {module_path(m, head): m for m in modules}
    targets = _target_modules(lora_config, head, dense)
    chosen = [m for key, m in keys.items() if _is_target(lora_config, key, targets)]
    if not chosen:
        raise ConfigError(
            f"LoRA target_modules {lora_config.target_modules!r} match no module of this {head} model; "
            f"its dense modules are e.g. {', '.join(sorted({m.rsplit('.', 1)[-1] for m in dense}))}"
        )
    refused = [m for m in chosen if m not in dense]
    if refused:
        raise ConfigError(
            "LoRA can wrap only dense (Linear) layers here; target_modules also match "
            + ", ".join(module_path(m, head) for m in refused)
            + (" (the LM head is tied to embed_tokens)" if "lm_head" in refused else "")
        )
    slots = {m: _slot(lora_config, m, module_path(m, head), modules[m][0].shape) for m in chosen if m in dense}
    copies = [s.name for m, ss in modules.items() if _is_module_to_save(lora_config, module_path(m, head)) for s in ss]
    saved = {name: PEFT_PREFIX + module_path(name, head) for name in copies}
    for spec in specs:
        module = spec.name.rsplit(".", 1)[0]
        trained = lora_config.bias == "all" or (lora_config.bias == "lora_only" and module in slots)
        if spec.kind in (DENSE_BIAS, NORM_BIAS) and trained and spec.name not in saved:
            # PEFT writes the bias of a wrapped module under its `base_layer`.
            inner = ".base_layer.bias" if module in slots else ".bias"
            saved[spec.name] = PEFT_PREFIX + module_path(module, head) + inner
    ordered = {m: slots[m] for m in modules if m in slots}
    shapes = {spec.name: spec.shape for spec in specs if spec.name in saved}
    return AdapterPlan(lora_config, head, ordered, saved, copies, shapes)


def _modules(specs) -> dict[str, list]:
    modules: dict[str, list] = {}
    for spec in specs:
        modules.setdefault(spec.name.rsplit(".", 1)[0], []).append(spec)
    return modules


def _target_modules(lora_config: LoraConfig, head: str, dense: set[str]):
    targets = lora_config.target_modules
    if targets is None:
        return list(DEFAULT_TARGET_MODULES)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # PEFT's "all-linear" leaves out the output embedding (lm_head) and, for SEQ_CLS, the classifier.
        left_out = {"lm_head"} | ({"score"} if lora_config.task_type == "SEQ_CLS" else set())
        return [module_path(m, head) for m in sorted(dense) if m not in left_out]
    return targets


def _is_target(lora_config: LoraConfig, key: str, targets) -> bool:
    """PEFT's check_target_module_exists for one module path."""
    if _matches_names_or_regex(lora_config.exclude_modules, key):
        return False
    if _is_module_to_save(lora_config, key, keeping_adapters_off=True):
        return False  # PEFT never wraps a module it also saves whole
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _in_transformed_layers(lora_config, key)


def _matches_names_or_regex(names, key: str) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{name}") for name in names)


def _is_module_to_save(lora_config: LoraConfig, key: str, keeping_adapters_off: bool = False) -> bool:
    names = lora_config.modules_to_save or []
    if keeping_adapters_off:  # how PEFT keeps adapters off modules_to_save
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in names)
    return any(key.endswith(m) for m in names)  # how PEFT picks modules_to_save (a plain suffix)


def _in_transformed_layers(lora_config: LoraConfig, key: str) -> bool:
    wanted = lora_config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = lora_config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == wanted if _is_int(wanted) else index in wanted


def _pattern_value(patterns: Mapping[str, Any], key: str, default):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _slot(lora_config: LoraConfig, module: str, key: str, weight_shape: tuple[int, ...]) -> LoraSlot:
    r = _pattern_value(lora_config.rank_pattern, key, lora_config.r)
    alpha = _pattern_value(lora_config.alpha_pattern, key, lora_config.lora_alpha)
    scaling = alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r
    out_features, in_features = weight_shape
    return LoraSlot(module, in_features, out_features, int(r), float(alpha), float(scaling))


# ----- values


def init_lora_weights(plan: AdapterPlan, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh LoRA tensors (float32, torch layout) as PEFT initialises them, from one seeded generator, so every
    framework starts an adapter from the same numbers.

    True: A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's Linear init, Kaiming-uniform with a=sqrt(5)), B = 0.
    "gaussian": A ~ N(0, 1/r), B = 0. False: A as for True and B ~ U(-1/sqrt(r), 1/sqrt(r)) (a non-trivial
    adapter, for tests).
    """
    init = plan.config.init_lora_weights
    if init not in FRESH_INITS:
        raise ConfigError(
            f"init_lora_weights={init!r} is not supported for a new adapter here; use true, false or 'gaussian' "
            "(an adapter already trained with another initialisation loads normally)"
        )
    rng = np.random.default_rng(seed)
    out = {}
    for slot in plan.slots.values():
        if init == "gaussian":
            a = rng.normal(0.0, 1.0 / slot.r, (slot.r, slot.in_features))
        else:
            bound = 1.0 / math.sqrt(slot.in_features)
            a = rng.uniform(-bound, bound, (slot.r, slot.in_features))
        if init is False:
            bound = 1.0 / math.sqrt(slot.r)
            b = rng.uniform(-bound, bound, (slot.out_features, slot.r))
        else:
            b = np.zeros((slot.out_features, slot.r))
        out[slot.a_name] = a.astype(np.float32)
        out[slot.b_name] = b.astype(np.float32)
    return out


def lora_delta(a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """What merging adds to a torch-layout [out, in] weight: scaling * B @ A, in float32."""
    return (scaling * (b.astype(np.float32) @ a.astype(np.float32))).astype(np.float32)


def merge_into(
    canonical: Mapping[str, np.ndarray], plan: AdapterPlan, tensors: Mapping[str, np.ndarray], dtype: Any = None
) -> dict:
    """Canonical base weights with the adapter merged: each wrapped weight plus its delta, modules_to_save and
    trained biases replaced by the adapter's values. Needs no framework.

    Args:
        dtype: of the changed tensors (default: the base's). The sum is taken in float32 and rounded once, so a
            float16 base merged for a float32 output keeps the adapter's full precision.
    """
    merged = dict(canonical)
    for slot in plan.slots.values():
        weight = canonical[slot.module + ".weight"]
        delta = lora_delta(tensors[slot.a_name], tensors[slot.b_name], slot.scaling)
        out = to_numpy_dtype(dtype) if dtype is not None else weight.dtype
        merged[slot.module + ".weight"] = (np.asarray(weight, np.float32) + delta).astype(out)
    for name in plan.saved:
        out = to_numpy_dtype(dtype) if dtype is not None else canonical[name].dtype
        merged[name] = np.asarray(tensors[name]).astype(out)
    return merged


class ParameterCount(NamedTuple):
    """A model's trainable and total parameter counts, counted as PEFT's get_nb_trainable_parameters does (the
    total includes the LoRA tensors and the adapters' copies of modules_to_save); prints as PEFT's
    print_trainable_parameters line."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {share:.4f}"


# ----- files


def to_file_tensors(plan: AdapterPlan, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter's canonical tensors under PEFT's names (torch layout), LoRA pairs then saved parameters."""
    names = [*plan.shapes(), *plan.saved]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"cannot save the adapter: it has no values for {', '.join(missing[:5])}")
    return {plan.file_name(n): np.ascontiguousarray(tensors[n]) for n in names}


def from_file_tensors(plan: AdapterPlan, file_tensors: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """A PEFT adapter file's tensors to canonical names, checked against the plan; every missing, unexpected or
    mis-shaped tensor is reported at once, by its file name."""
    expected = {plan.file_name(n): (n, shape) for n, shape in plan.shapes().items()}
    for name, file_name in plan.saved.items():
        expected[file_name] = (name, plan.saved_shapes[name])
        if file_name.endswith(".base_layer.bias"):  # older PEFT wrote a wrapped module's bias as `.bias`
            expected.setdefault(file_name.replace(".base_layer.bias", ".bias"), (name, plan.saved_shapes[name]))
    copies = tuple(PEFT_PREFIX + module_path(n.rsplit(".", 1)[0], plan.head) for n in plan.module_copies)
    tensors: dict[str, np.ndarray] = {}
    unexpected, mis_shaped = [], []
    for file_name, array in file_tensors.items():
        if file_name not in expected:
            if file_name.startswith(tuple(f"{c}.{inner}." for c in copies for inner in _WRAPPER_INNER)):
                continue  # with bias="all" PEFT also saves its ModulesToSaveWrapper's inner copies
            unexpected.append(file_name)
            continue
        name, shape = expected[file_name]
        if tuple(array.shape) != tuple(shape):
            mis_shaped.append(f"{file_name}: file has shape {tuple(array.shape)}, the adapter config needs {shape}")
            continue
        tensors[name] = np.asarray(array)
    missing = sorted({plan.file_name(n) for n, _ in expected.values() if n not in tensors})
    if missing or unexpected or mis_shaped:
        lines = [f"{source} does not match its adapter_config.json and this model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                shown = items if len(items) <= 12 else items[:12] + [f"... and {len(items) - 12} more"]
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        raise CheckpointError("\n".join(lines))
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
            continue
        raise CheckpointError(f"{source}: tensor {plan.file_name(name)!r} has dtype {array.dtype}, not a float")
    return tensors


_WRAPPER_INNER = ("modules_to_save", "original_module")


def read_adapter(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> tuple[LoraConfig, dict[str, np.ndarray], str]:
    """(config, {PEFT file name: array}, the weights file) of an adapter folder or hub repository.

    Reads `adapter_model.safetensors`, else `adapter_model.bin` (through the restricted unpickler: no code runs).
    The names still need `from_file_tensors` against a model's plan.
    """
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    path = Path(name_or_path)
    if path.exists():
        complete_interrupted_save(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not an adapter folder (one holding {CONFIG_NAME})")
    config = LoraConfig.from_json_file(resolve_file(name_or_path, CONFIG_NAME, **hub))
    errors = []
    for weights_name, read in ((SAFETENSORS_NAME, read_safetensors), (BIN_NAME, load_state_dict)):
        try:
            weights = resolve_file(name_or_path, weights_name, **hub)
        except CheckpointError as error:
            errors.append(str(error))
            continue
        return config, dict(read(weights)), str(weights)
    raise CheckpointError(f"no adapter weights ({SAFETENSORS_NAME} or {BIN_NAME}): " + "; ".join(errors))


def load_adapter_tensors(
    name_or_path: str | os.PathLike, config: OPTConfig, head: str, is_trainable: bool = False, **hub: Any
) -> tuple[AdapterPlan, dict[str, np.ndarray]]:
    """An adapter folder or hub id read for a model of `config` and `head`: its plan and canonical tensors.

    Args:
        is_trainable: recorded as PEFT does, in the config's inference_mode (its opposite).
        hub: revision, cache_dir, local_files_only, token for a hub id.
    """
    lora_config, file_tensors, source = read_adapter(name_or_path, **hub)
    lora_config = dataclasses.replace(lora_config, inference_mode=not is_trainable)
    plan = plan_adapter(lora_config, config, head)
    return plan, from_file_tensors(plan, file_tensors, source)


def write_adapter(
    folder: str | os.PathLike,
    plan: AdapterPlan,
    tensors: Mapping[str, np.ndarray],
    *,
    safe_serialization: bool = True,
    base_model_name_or_path: str | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> Path:
    """Writes PEFT's adapter folder atomically: adapter_config.json and the weights (and `extra_files`, e.g. a
    trainer's state and the tokenizer) in one commit, so a crash leaves the previous adapter or the new one;
    removes the other format's stale weights file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save an adapter to {folder}: it is a file")
    folder.mkdir(parents=True, exist_ok=True)
    file_tensors = to_file_tensors(plan, tensors)
    # PEFT's save_pretrained writes inference_mode: true whatever the model's mode (loading decides trainability).
    config = dataclasses.replace(plan.config, inference_mode=True)
    if base_model_name_or_path is not None:
        config = dataclasses.replace(config, base_model_name_or_path=base_model_name_or_path)
    weights_name, write = (SAFETENSORS_NAME, write_safetensors) if safe_serialization else (BIN_NAME, save_state_dict)
    stale = BIN_NAME if safe_serialization else SAFETENSORS_NAME
    with FolderCommit(folder) as commit:
        write(file_tensors, commit.path(weights_name))
        commit.write(CONFIG_NAME, config.to_json_string())
        for name, data in (extra_files or {}).items():
            commit.write(name, data)
        commit.commit(lambda: [stale] if (folder / stale).exists() else [])
    return folder


def merge_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fmt: str = "safetensors",
    dtype: Any = None,
    **hub: Any,
) -> list[Path]:
    """Writes a full checkpoint of `base` with `adapter` merged (HF's layout, any framework or HF loads it), with
    the base's tokenizer files; the head is the adapter's task type's. Needs no framework.

    Args:
        base, adapter: folders or hub ids.
        output: the folder to write.
        fmt: the weight format written.
        dtype: the saved dtype (default: the base's).
        hub: revision, cache_dir, local_files_only, token for hub ids.
    """
    from opt_core.heads import ARCHITECTURE_OF_HEAD
    from opt_core.pretrained import load_pretrained, save_pretrained

    lora_config, file_tensors, source = read_adapter(adapter, **hub)
    head = HEAD_OF_TASK_TYPE.get(lora_config.task_type or "CAUSAL_LM", "causal_lm")
    loaded = load_pretrained(base, head, **hub)
    plan = plan_adapter(lora_config, loaded.config, head)
    merged = merge_into(loaded.tensors, plan, from_file_tensors(plan, file_tensors, source), dtype)
    tokenizer = {n: (loaded.folder / n).read_bytes() for n in TOKENIZER_FILES if (loaded.folder / n).is_file()}
    return save_pretrained(
        output,
        merged,
        loaded.config,
        head,
        architecture=ARCHITECTURE_OF_HEAD[head],
        generation_config=loaded.generation_config,
        fmt=fmt,
        dtype=dtype if dtype is not None else loaded.stored_dtype,
        extra_files=tokenizer,
    )


# ----- the model methods every framework shares


class AdapterMethods:
    """PEFT's adapter methods (named as HF transformers' PEFT integration) written once for the three frameworks.

    A framework's mixin provides `config`, `head`, `peft_config` ({adapter name: LoraConfig}),
    `trainable_parameters()`, `adapter_arrays(adapter_name)` ((plan, canonical tensors) of an adapter, default the
    active one) and `_attach_adapter(name, plan, tensors, trainable)`, which puts an adapter on the model and
    activates it; `tensors` holds the LoRA pairs and any saved parameters the adapter brings (a fresh adapter's
    modules_to_save copies and trained biases start from the model's current values).
    """

    def add_adapter(self, config: LoraConfig | Mapping[str, Any], adapter_name: str = "default", seed: int = 0):
        """Adds a fresh adapter (PEFT's initialisation drawn from `seed`: the same numbers in every framework),
        activates it and enables adapters; only its LoRA tensors, modules_to_save copies and trained biases train.

        Args:
            config: a LoraConfig, or its adapter_config.json keys as a dict.
            adapter_name: a name no adapter of this model has (ValueError otherwise).
            seed: of the LoRA tensors' draws.
        """
        if isinstance(config, Mapping):
            config = LoraConfig.from_dict(config)
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"add_adapter takes a LoraConfig or a dict, got {type(config).__name__}")
        self._check_new_adapter_name(adapter_name)
        plan = plan_adapter(config, self.config, self.head)
        self._attach_adapter(adapter_name, plan, init_lora_weights(plan, seed), trainable=True)

    def load_adapter(
        self,
        path_or_hub_id: str | os.PathLike,
        adapter_name: str = "default",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        is_trainable: bool = False,
    ) -> None:
        """Loads a PEFT adapter folder or hub repository and makes it the active adapter. The biases it trained
        (bias "all" or "lora_only") are the model's biases while it acts, as in PEFT; the base's own come back when
        the adapters are disabled or it is deleted.

        Args:
            path_or_hub_id: a folder with adapter_config.json and adapter_model.safetensors (or .bin), or a hub id.
            adapter_name: a name no adapter of this model has (ValueError otherwise).
            revision, token, local_files_only, cache_dir: for a hub id (huggingface_hub's meanings).
            is_trainable: keep its tensors trainable (PEFT loads adapters frozen, for inference, by default).
        """
        self._check_new_adapter_name(adapter_name)
        hub = dict(revision=revision, token=token, local_files_only=local_files_only, cache_dir=cache_dir)
        plan, tensors = load_adapter_tensors(path_or_hub_id, self.config, self.head, is_trainable, **hub)
        self._attach_adapter(adapter_name, plan, tensors, trainable=is_trainable)

    def save_adapter(
        self, path: str | os.PathLike, adapter_name: str | None = None, safe_serialization: bool = True
    ) -> Path:
        """Writes an adapter (default: the active one) as PEFT does: adapter_config.json and
        adapter_model.safetensors (`.bin` with safe_serialization=False), which PEFT and every framework here load.
        Returns the folder."""
        plan, tensors = self.adapter_arrays(adapter_name)
        base = None if plan.config.base_model_name_or_path else getattr(self, "name_or_path", None)
        return write_adapter(path, plan, tensors, safe_serialization=safe_serialization, base_model_name_or_path=base)

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: trainable params: N || all params: M || trainable%: P."""
        print(self.trainable_parameters())

    def _check_new_adapter_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"an adapter name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"this model already has an adapter named {adapter_name!r}; delete it or pick another")
