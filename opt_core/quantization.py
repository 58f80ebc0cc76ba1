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
* On disk (safetensors, canonical torch names): the int8 tensor under the weight's own name, its scales beside it
  as `{module}.weight_scale` (float32 [out]), and config.json's `quantization_config`
  (`{"quant_method": "opt_lm_int8", "bits": 8, "scheme": "symmetric_per_channel", "modules": [...]}`).
  Only this library reads the layout correctly. HF transformers 5.23 does not refuse it: it warns "Unknown
  quantization type ... we will skip the quantization", reports the scales as unexpected keys and loads the int8
  values as if they were float weights (tests/test_quantization.py holds that behaviour, so a change shows).

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

QUANT_METHOD = "opt_lm_int8"
SCHEME = "symmetric_per_channel"
BITS = 8
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
    """The module leaf names config.json's `modules` lists, in table order (`q_proj`, `fc1`, ...)."""
    leaves = (name.rsplit(".", 2)[-2] for name in quantized_weight_names(config, "base"))
    return list(dict.fromkeys(leaves))


def quantization_config(config: OPTConfig) -> dict[str, Any]:
    """config.json's `quantization_config` of an int8 model of this config."""
    return {"quant_method": QUANT_METHOD, "bits": BITS, "scheme": SCHEME, "modules": quantized_modules(config)}


def is_quantized(config: OPTConfig) -> bool:
    """Whether config.json says the weights are int8, after checking that this library can read what it says."""
    found = config.extra.get(CONFIG_KEY)
    if found is None:
        return False
    if not isinstance(found, dict):
        raise ConfigError(f"config.json: {CONFIG_KEY} must be an object, got {found!r}")
    method = found.get("quant_method")
    if method != QUANT_METHOD:
        raise ConfigError(
            f"config.json: {CONFIG_KEY} has quant_method {method!r}; this library reads only {QUANT_METHOD!r} "
            "(its own int8 layout)"
        )
    expected = quantization_config(config)
    for key in ("bits", "scheme"):
        if found.get(key) != expected[key]:
            raise ConfigError(f"config.json: {CONFIG_KEY}.{key} is {found.get(key)!r}; expected {expected[key]!r}")
    modules = found.get("modules")
    if not isinstance(modules, list) or sorted(map(str, modules)) != sorted(expected["modules"]):
        raise ConfigError(
            f"config.json: {CONFIG_KEY}.modules is {modules!r}; this library quantizes {expected['modules']}"
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
    return {**tensors, **{scale_name(n): scales[scale_name(n)] for n in targets if n in tensors}}


def _check_pair(name: str, weight: Any, scale: Any) -> list[str]:
    if weight is None:
        return []  # missing weights are match_checkpoint's to report
    if not _is_int8(weight):
        return [f"{name}: stored as {np.dtype(weight.dtype).name}; the {CONFIG_KEY} needs int8"]
    label, want = scale_name(name), (weight.shape[0],)
    if scale is None:
        return [f"{label}: missing"]
    if np.dtype(scale.dtype) != np.float32:
        return [f"{label}: stored as {np.dtype(scale.dtype).name}; scales are float32"]
    if tuple(scale.shape) != want:
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
