"""`pipeline("text-generation", ...)`: prompt text in, generated text out, in any of the three frameworks.

As HF's text-generation pipeline: one string gives `[{"generated_text": ...}]` (one dict per returned sequence),
a list of strings gives one such list per prompt; `return_full_text=False` returns only the continuation; every
other keyword is a generation option (`max_new_tokens`, `do_sample`, `top_p`, `num_beams`, ...). The framework is
imported only when a pipeline for it is built, so importing this module imports none.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from opt_core.errors import ConfigError, InputError

_MODEL_CLASSES = {
    "pt": ("opt_torch", "OPTForCausalLM"),
    "tf": ("opt_tf", "TFOPTForCausalLM"),
    "flax": ("opt_flax", "FlaxOPTForCausalLM"),
}


def pipeline(
    task: str,
    model: str | os.PathLike | Any = None,
    tokenizer: Any = None,
    framework: str = "pt",
    batch_size: int = 1,
    **model_kwargs: Any,
) -> TextGenerationPipeline:
    """Builds a text-generation pipeline.

    Args:
        task: "text-generation" (the only task).
        model: a folder or hub id, or an already loaded causal-LM model of `framework`.
        tokenizer: an OPTTokenizer, a folder or hub id; defaults to the model's folder.
        framework: "pt" (PyTorch), "tf" (Keras) or "flax".
        batch_size: prompts generated together (left-padded).
        **model_kwargs: passed to the model's from_pretrained (e.g. dtype) when `model` is a name.
    """
    from opt_core.tokenizer import OPTTokenizer

    if task != "text-generation":
        raise ConfigError(f"unsupported task {task!r}: task must be 'text-generation', this library's only task")
    if framework not in _MODEL_CLASSES:
        raise ConfigError(f"framework must be one of {', '.join(map(repr, _MODEL_CLASSES))}, got {framework!r}")
    if model is None:
        raise ConfigError("model=None: pipeline() needs a model: a folder, a hub id, or a loaded model")
    _check_batch_size(batch_size)
    source = model if isinstance(model, (str, os.PathLike)) else None
    if tokenizer is None and source is None:
        raise ConfigError("tokenizer=None: pass tokenizer= when the model is an object, not a folder or hub id")
    if source is not None:
        module_name, class_name = _MODEL_CLASSES[framework]
        module = __import__(module_name)
        model = getattr(module, class_name).from_pretrained(source, **model_kwargs)
    if tokenizer is None:
        tokenizer = source
    if not hasattr(tokenizer, "decode"):
        tokenizer = OPTTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, framework, batch_size)


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def _prompts(text_inputs: Any) -> list[str]:
    """The prompts of one call, every one checked before any is generated."""
    if isinstance(text_inputs, str):
        return [text_inputs]
    if not isinstance(text_inputs, (list, tuple)) or not text_inputs:
        raise InputError(f"text_inputs must be a string or a non-empty list of strings, got {text_inputs!r}")
    for i, text in enumerate(text_inputs):
        if not isinstance(text, str):
            raise InputError(f"text_inputs[{i}] must be a string, got {text!r}")
    return list(text_inputs)


class TextGenerationPipeline:
    """Callable: `pipe(text_or_texts, return_full_text=True, **generate_options)`."""

    def __init__(self, model, tokenizer, framework: str, batch_size: int = 1):
        _check_batch_size(batch_size)
        self.model, self.tokenizer, self.framework, self.batch_size = model, tokenizer, framework, batch_size

    def __call__(self, text_inputs: str | list[str], return_full_text: bool = True, **generate_kwargs: Any):
        single = isinstance(text_inputs, str)
        prompts = _prompts(text_inputs)
        if not isinstance(return_full_text, bool):
            raise ConfigError(f"return_full_text must be True or False, got {return_full_text!r}")
        results = []
        for start in range(0, len(prompts), self.batch_size):
            results.extend(self._run(prompts[start : start + self.batch_size], return_full_text, generate_kwargs))
        return results[0] if single else results

    def _run(self, prompts: list[str], return_full_text: bool, generate_kwargs: dict) -> list[list[dict]]:
        encoded = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="np")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        sequences = self._generate(ids, mask, generate_kwargs)
        per_prompt = sequences.shape[0] // len(prompts)
        out = []
        for i, prompt in enumerate(prompts):
            prefix = len(self.tokenizer.decode(ids[i], skip_special_tokens=True))
            texts = []
            for sequence in sequences[i * per_prompt : (i + 1) * per_prompt]:
                text = self.tokenizer.decode(sequence, skip_special_tokens=True)
                texts.append({"generated_text": (prompt if return_full_text else "") + text[prefix:]})
            out.append(texts)
        return out

    def _generate(self, ids: np.ndarray, mask: np.ndarray, options: dict) -> np.ndarray:
        if self.framework == "pt":
            import torch

            out = self.model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **options)
            return out.cpu().numpy()
        return np.asarray(self.model.generate(ids, attention_mask=mask, **options))
