"""int8 weight-only quantization: per-output-channel symmetric int8 values with float32 scales (as CTranslate2's
int8), in numpy, and its on-disk layout. Quantized weights are another dtype of the parameter table's rows.

* `quantize_int8(w)`: w [out, in] -> (q int8 [out, in], scale float32 [out]), scale = max|w_row| / 127 and
  q = round(w / scale), so |w - q * scale| <= scale / 2 everywhere; an all-zero row gets scale 1 (q = 0).
* Which weights: the dense weights of the decoder (`opt_core.weights` DENSE_WEIGHT rows of the base model:
  q/k/v/out_proj, fc1, fc2, project_in/out). Embeddings, norms and biases stay float, and so do the heads:
  a tied LM head is the token embedding (a lookup table); an untied `lm_head`, `score` and `qa_outputs` are
  kept float as HF's quantizers keep their output head by default (`modules_to_not_convert`/`lm_head`): the
  logits are the output itself, so their rounding is not averaged away by later layers. Measured on the tests'
  tiny untied model (tests/test_quantization.py::test_untied_head_stays_float_and_why): quantizing its
  lm_head too raises the worst relative logit error against fp32 from 1.08e-2 to 1.35e-2 (by a quarter). An
  untied head of opt-125m's shape would be a third of the weight bytes, so this is a trade worth revisiting for
  speed; no OPT checkpoint unties it. The classifier heads (C x E, 2 x E) hold a few kilobytes, so quantizing
  them would save nothing measurable.
* On disk: compressed-tensors' "naive-quantized" layout, the one HF transformers (through the
  `compressed-tensors` package) and vLLM read. In safetensors under canonical torch names, the int8 tensor
  under the weight's own name and its float32 scales beside it as `{module}.weight_scale`, shaped [out, 1];
  config.json's `quantization_config` says `quant_method: "compressed-tensors"`, `format: "naive-quantized"`,
  and one group targeting `Linear` with int 8-bit symmetric per-channel weights and float activations; the
  heads are in `ignore`. HF transformers 5.23 with compressed-tensors 0.20 loads such a folder and gives the
  logits of the dequantized float model exactly (tests/test_quantization.py checks it); without that package
  HF refuses the folder and says to install it. Folders this library wrote before (quant_method
  `opt_lm_int8`, scales [out]) still load.

`split_scales` and `check_quantized` are the loading side (`opt_core.checkpoint.load_checkpoint`): they take the
scales out of a file's tensors before the table's name and shape checks, and check every int8 weight and scale
like a hostile file's, naming the tensor. Siblings: `opt_torch/quantization.py` (the int8 linear layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError, ConfigError
from opt_core.weights import DENSE_WEIGHT, parameter_specs

QUANT_METHOD = "compressed-tensors"
FORMAT = "naive-quantized"  # int8 values stored as int8, one per element (not packed into int32)
LEGACY_METHOD = "opt_lm_int8"  # this library's first int8 layout: read, never written
BITS = 8
IGNORED = ["lm_head", "score", "qa_outputs"]  # HF's Linear modules that stay float: the heads
SCALE_SUFFIX = "_scale"  # `fc1.weight` -> `fc1.weight_scale`
CONFIG_KEY = "quantization_config"
QUANTIZE_CHOICES = ("int8",)  # the values of `quantize=` and `--quantize`
_QMAX = 127  # symmetric: -127..127, so -w quantizes to -q


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 of a dense weight [out, in] (any float dtype).

    Returns:
        (q int8 [out, in], scale float32 [out]) with scale = max|row| / 127 (1 for an all-zero row) and
        q = round(w / scale) (half to even), computed in float32.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8 takes a 2-d weight [out, in], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("cannot quantize a weight holding NaN or infinity")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = np.where(amax > 0, amax / np.float32(_QMAX), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -_QMAX, _QMAX).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """q [out, in] int8 and scale [out] -> q * scale (computed in float32, then cast to `dtype`)."""
    return (np.asarray(q, np.float32) * np.asarray(scale, np.float32)[:, None]).astype(dtype)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def quantized_weight_names(config: OPTConfig, head: str) -> list[str]:
    """Canonical names of the weights int8 quantization replaces: the decoder's dense weights (table order)."""
    return [spec.name for spec in parameter_specs(config, head) if spec.kind == DENSE_WEIGHT and not spec.is_head]


def quantized_modules(config: OPTConfig) -> list[str]:
    """The module leaf names int8 quantization replaces, in table order (`q_proj`, `fc1`, ...)."""
    leaves = (name.rsplit(".", 2)[-2] for name in quantized_weight_names(config, "base"))
    return list(dict.fromkeys(leaves))


def _weight_args() -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs of the weights: int8, symmetric, one scale per output channel."""
    return {
        "num_bits": BITS,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "channel",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(config: OPTConfig | None = None) -> dict[str, Any]:
    """config.json's `quantization_config` of an int8 model: compressed-tensors' naive-quantized W8A16 scheme."""
    group = {
        "targets": ["Linear"],
        "weights": _weight_args(),
        "input_activations": None,
        "output_activations": None,
        "format": FORMAT,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(IGNORED),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def is_quantized(config: OPTConfig) -> bool:
    """Whether config.json says the weights are int8, after checking that this library can compute what it says
    (which tensors are int8 is checked against the file when it is read: `check_quantized`)."""
    found = config.extra.get(CONFIG_KEY)
    if found is None:
        return False
    if not isinstance(found, dict):
        raise ConfigError(f"config.json: {CONFIG_KEY} must be an object, got {found!r}")
    method = found.get("quant_method")
    if method == LEGACY_METHOD:
        return _check_legacy(found)
    if method != QUANT_METHOD:
        raise ConfigError(
            f"config.json: {CONFIG_KEY}.quant_method is {method!r}; this library reads {QUANT_METHOD!r} int8 "
            "weight-only checkpoints (per-channel symmetric, format naive-quantized)"
        )
    _check_compressed_tensors(found)
    return True


def _check_compressed_tensors(found: dict) -> None:
    """Refuses, by field, every compressed-tensors scheme other than int8 per-channel symmetric weight-only."""

    def refuse(field: str, value: Any, wanted: Any) -> None:
        raise ConfigError(
            f"config.json: {CONFIG_KEY}.{field} is {value!r}; this library reads only {wanted!r} "
            "(int8 per-channel symmetric weights, float activations, format naive-quantized)"
        )

    if found.get("format", FORMAT) != FORMAT:
        refuse("format", found.get("format"), FORMAT)
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if found.get(key):
            refuse(key, found[key], None)
    groups = found.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        refuse("config_groups", groups, "one group")
    ((name, group),) = groups.items()
    if not isinstance(group, dict):
        refuse(f"config_groups.{name}", group, "an object")
    if group.get("format") not in (None, FORMAT):
        refuse(f"config_groups.{name}.format", group.get("format"), FORMAT)
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            refuse(f"config_groups.{name}.{key}", group[key], None)
    weights = group.get("weights")
    if not isinstance(weights, dict):
        refuse(f"config_groups.{name}.weights", weights, "an object")
    wanted = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    for key, value in wanted.items():
        if weights.get(key, value) != value:
            refuse(f"config_groups.{name}.weights.{key}", weights.get(key), value)
    if weights.get("group_size") not in (None, -1) or weights.get("actorder"):
        refuse(f"config_groups.{name}.weights.group_size", weights.get("group_size"), None)


def _check_legacy(found: dict) -> bool:
    """This library's first layout: `{"quant_method": "opt_lm_int8", "bits": 8, "scheme":
    "symmetric_per_channel", "modules": [...]}`, scales [out]."""
    if found.get("bits") != BITS or found.get("scheme") != "symmetric_per_channel":
        raise ConfigError(
            f"config.json: {CONFIG_KEY} {LEGACY_METHOD!r} needs bits 8 and scheme 'symmetric_per_channel', got "
            f"bits {found.get('bits')!r} and scheme {found.get('scheme')!r}"
        )
    return True


def with_quantization_config(config: OPTConfig, quantized: bool) -> OPTConfig:
    """A copy of `config` whose `quantization_config` says whether the weights saved with it are int8."""
    extra = {k: v for k, v in config.extra.items() if k != CONFIG_KEY}
    if quantized:
        extra[CONFIG_KEY] = quantization_config(config)
    return config.replace(extra=extra)


def quantize_state(canonical: Mapping[str, Any], config: OPTConfig, head: str) -> dict[str, Any]:
    """Canonical float tensors -> the same with every `quantized_weight_names` weight int8 and its scale beside it
    (the other tensors as they are, not copied)."""
    targets = set(quantized_weight_names(config, head))
    out: dict[str, Any] = {}
    for name, array in canonical.items():
        if name in targets:
            out[name], out[scale_name(name)] = quantize_int8(array)
        else:
            out[name] = array
    return out


def dequantize_state(canonical: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The canonical tensors with every int8 weight replaced by `dequantize_int8` in `dtype` and the scales
    dropped (the other tensors as they are, not copied)."""
    out: dict[str, Any] = {}
    for name, array in canonical.items():
        if name.endswith(".weight" + SCALE_SUFFIX):
            continue
        scale = canonical.get(scale_name(name))
        out[name] = array if scale is None else dequantize_int8(array, scale, dtype)
    return out


def has_scales(canonical: Mapping[str, Any]) -> bool:
    return any(name.endswith(".weight" + SCALE_SUFFIX) for name in canonical)


# ----- loading: scales out before the table's checks, then every quantized tensor checked


def split_scales(file_tensors: Mapping[str, Any], quantized: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """({weights}, {scales by the file's names}) of a torch-style file; scales only when the config is quantized
    (otherwise they stay with the weights, for the table to report as unexpected)."""
    if not quantized:
        return dict(file_tensors), {}
    weights, scales = {}, {}
    for name, array in file_tensors.items():
        (scales if name.endswith(".weight" + SCALE_SUFFIX) else weights)[name] = array
    return weights, scales


def check_quantized(
    tensors: dict[str, Any],
    file_scales: Mapping[str, Any],
    quantized: bool,
    config: OPTConfig,
    head: str,
    source: str,
) -> dict[str, Any]:
    """Checks a matched checkpoint's int8 weights and their scales; returns the tensors with the scales added
    under canonical names. Not quantized: refuses int8 tensors (they would load as their integer values).

    Args:
        tensors: {canonical name: array} after `opt_core.weights.match_checkpoint`.
        file_scales: {file name: array} from `split_scales`.
        quantized: `is_quantized(config)`.
    """
    if not quantized:
        _raise(source, [f"{n}: int8, but config.json has no {CONFIG_KEY}" for n in tensors if _is_int8(tensors[n])])
        return tensors
    targets = quantized_weight_names(config, head)
    problems = []
    scales = {("model." + n if n.startswith("decoder.") else n): a for n, a in file_scales.items()}
    wanted = {scale_name(n) for n in targets}
    problems += [f"{n}: unexpected (no quantized weight of that name)" for n in scales if n not in wanted]
    for name in targets:
        problems += _check_pair(name, tensors.get(name), scales.get(scale_name(name)))
    problems += [f"{n}: int8, but not a quantized weight" for n in tensors if n not in targets and _is_int8(tensors[n])]
    _raise(source, problems)
    return {**tensors, **{scale_name(n): _vector(scales[scale_name(n)]) for n in targets if n in tensors}}


def file_scale(scale: Any) -> np.ndarray:
    """A weight's scales as written: float32 [out, 1] (compressed-tensors' per-channel shape)."""
    return np.asarray(scale, dtype=np.float32).reshape(-1, 1)


def _vector(scale: Any) -> np.ndarray:
    """Scales as this library holds them: [out] (the file's [out, 1], or [out] from the legacy layout)."""
    return np.asarray(scale).reshape(-1)


def _check_pair(name: str, weight: Any, scale: Any) -> list[str]:
    if weight is None:
        return []  # missing weights are match_checkpoint's to report
    if not _is_int8(weight):
        return [f"{name}: stored as {np.dtype(weight.dtype).name}; the {CONFIG_KEY} needs int8"]
    label, want = scale_name(name), (weight.shape[0], 1)
    if scale is None:
        return [f"{label}: missing"]
    if np.dtype(scale.dtype) != np.float32:
        return [f"{label}: stored as {np.dtype(scale.dtype).name}; scales are float32"]
    if tuple(scale.shape) not in (want, want[:1]):
        return [f"{label}: shape {tuple(scale.shape)}, the weight needs {want}"]
    values = np.asarray(scale)
    if not (np.isfinite(values).all() and (values > 0).all()):
        bad = int((~np.isfinite(values) | ~(values > 0)).sum())
        return [f"{label}: {bad} of {values.size} scales are not finite and positive"]
    return []


def _is_int8(array: Any) -> bool:
    return np.dtype(array.dtype) == np.int8


def _raise(source: str, problems: list[str]) -> None:
    if problems:
        shown = problems if len(problems) <= 20 else problems[:20] + [f"... and {len(problems) - 20} more"]
        raise CheckpointError(f"{source}: bad int8 quantized weights:\n  " + "\n  ".join(shown))
