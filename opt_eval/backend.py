"""The `opt-lm` model of lm-evaluation-harness: any OPT folder or hub id, in PyTorch, Keras or Flax.

    lm_eval's model arguments: pretrained=, framework=torch|tf|flax, dtype=, quantize=int8 (torch), adapter=,
    batch_size=, max_length= (default: the model's max_position_embeddings), seed= (for do_sample).

Requests are tokenized and scored as lm_eval's HF backend (`HFLM`) does, so both give the same numbers for the same
weights: the (context, continuation) split is lm_eval's own (`TemplateLM`, inherited), truncation and rolling
windows are `opt_core.scoring`'s, batches are right-padded for scoring and left-padded for generation. The model is
this library's, loaded through `opt_cli.frameworks.load_causal_lm` (numpy in, numpy out).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import lm_eval.models  # noqa: F401  lm_eval's own names first: its get_model fills an empty registry only
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from opt_core import scoring
from opt_core.errors import ConfigError

FRAMEWORKS = ("torch", "tf", "flax")
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "opt_cli", "default_model")


def _integer(name: str, value: Any, low: int = 1) -> int:
    """A model argument that must be a whole number of at least `low` (lm_eval passes numbers or strings)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < low:
        raise ConfigError(f"{name} must be an integer of at least {low}, got {value!r}")
    return int(text)


def _check_options(framework: str, quantize: Any) -> None:
    if framework not in FRAMEWORKS:
        raise ConfigError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if quantize is not None and quantize != "int8":
        raise ConfigError(f"quantize must be int8 (or left out), got {quantize!r}")
    if quantize and framework != "torch":
        raise ConfigError(f"quantize={quantize} is implemented for framework=torch only so far, not {framework}")


@register_model("opt-lm")
class OPTLM(TemplateLM):
    """lm_eval's `LM` over this library's causal LM in one framework.

    Args:
        pretrained: a folder or hub id (default: the embedded model).
        framework: "torch", "tf" or "flax".
        dtype: from_pretrained's dtype (float32 by default; "auto", "float16", "bfloat16").
        quantize: "int8" (torch only).
        adapter: a PEFT LoRA adapter folder or hub id applied to the model.
        batch_size: requests per forward pass or generate call.
        max_length: tokens per window (default, and at most, the model's max_position_embeddings).
        seed: seeds sampling when a task asks for do_sample.
        device, max_batch_size: lm_eval's command line passes them to every model; ignored (the framework places
            the model: torch computes on the CPU, Keras and JAX on their default device).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        framework: str = "torch",
        dtype: str | None = None,
        quantize: str | None = None,
        adapter: str | None = None,
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        seed: int | str = 1234,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown model argument(s) for opt-lm: {', '.join(sorted(unknown))}; "
                "use pretrained, framework, dtype, quantize, adapter, batch_size, max_length, seed"
            )
        _check_options(framework, quantize)
        self.pretrained = str(pretrained or DEFAULT_MODEL)
        self.framework = framework
        self._batch_size = _integer("batch_size", batch_size)
        self.seed = _integer("seed", seed, low=0)
        self.model, self.tokenizer = _load(self.pretrained, framework, dtype, quantize, adapter)
        positions = self.model.config.max_position_embeddings
        self._max_length = positions if max_length is None else _integer("max_length", max_length)
        self._logits = _jitted_logits(self.model) if framework == "flax" else self.model.logits
        if self._max_length > positions:
            raise ConfigError(f"max_length={self._max_length} exceeds the model's max_position_embeddings={positions}")

    def _rows(self, count: int) -> int:
        """Rows per forward pass: Flax compiles once per shape, so its batches are always full."""
        return self.batch_size if self.framework == "flax" else count

    # ----- what lm_eval asks of every LM

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256  # HFLM's default when a task does not say

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids with OPT's `</s>` in front, unless the text already starts with it (HFLM's rule)."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    # ----- log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """[(request strings or None, context ids, continuation ids)] -> [(log-likelihood, is_greedy)], in order.

        Longest first, so a batch is padded to its first row's length and a too-long input fails at once."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="opt-lm loglikelihood", file=sys.stderr) as bar:
            for batch in _chunks(order, self.batch_size):
                for i, answer in zip(batch, self._score_batch([requests[i] for i in batch])):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(batch))
        return results

    def _score_batch(self, requests) -> list[tuple[float, bool]]:
        inputs = [scoring.model_input(context, continuation, self.max_length) for _, context, continuation in requests]
        rows = inputs + [inputs[0]] * (self._rows(len(inputs)) - len(inputs))
        length = _bucket(max(len(row) for row in rows), self.max_length)
        ids, mask = scoring.right_padded(rows, self.tokenizer.pad_token_id, length)
        logits = self._logits(ids, mask)  # B T V
        return [
            scoring.continuation_score(row, len(fed), continuation)
            for row, fed, (_, _, continuation) in zip(logits, inputs, requests)
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, scored in rolling windows of `max_length` tokens."""
        texts = [request.args[0] for request in requests]
        owners, windows = [], []
        for index, text in enumerate(texts):
            for context, continuation in scoring.rolling_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length
            ):
                owners.append(index)
                windows.append((None, context, continuation))
        totals = [0.0] * len(texts)
        for owner, (log_likelihood, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += log_likelihood
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ----- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task says do_sample) continuations, cut at the first of `until`."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="opt-lm generate_until", file=sys.stderr) as bar:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[1]
                contexts = [requests[i].args[0] for i in indices]
                for i, text in zip(indices, self._generate_group(contexts, gen_kwargs)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        return results

    def _generate_group(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        """The texts for contexts that share generation options, longest context first in each batch."""
        options = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(options.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
        max_new_tokens = options.pop("max_gen_toks")
        if max_new_tokens >= self.max_length:
            raise ConfigError(
                f"max_gen_toks={max_new_tokens} leaves no room for the context in max_length={self.max_length}"
            )
        prompts = [self.tok_encode(context)[-(self.max_length - max_new_tokens) :] for context in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        for batch in _chunks(order, self.batch_size):
            generated = self._generate_batch([prompts[i] for i in batch], until, max_new_tokens, options)
            for i, text in zip(batch, generated):
                texts[i] = postprocess_generated_text(text, until, None)
        return texts

    def _generate_batch(self, prompts, until: list[str], max_new_tokens: int, options: dict) -> list[str]:
        """The generated text of each prompt, stopped at eos, max_new_tokens, or a stop string.

        Our stop check looks at the end of prompt + new text; HFLM looks at the new text only. A row stopped by a
        match that starts inside the prompt is generated again without stop strings, so both cut the same text."""
        stops = [s for s in until if s and s != self.tokenizer.decode([self.eot_token_id])]
        new_ids = self._generate_ids(prompts, max_new_tokens, options, stops)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in new_ids]
        again = [i for i, row in enumerate(new_ids) if stops and self._stopped_in_prompt(row, texts[i], stops)]
        if again:
            redone = self._generate_ids([prompts[i] for i in again], max_new_tokens, options, [])
            for i, row in zip(again, redone):
                texts[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return texts

    def _stopped_in_prompt(self, new_ids: Sequence[int], text: str, stops: list[str]) -> bool:
        """A row that ended before eos and max_new_tokens (its pads) with no stop string in its new text."""
        real = [t for t in new_ids if t != self.tokenizer.pad_token_id]
        ended = self.eot_token_id in real or len(real) == len(new_ids)
        return not ended and not any(stop in text for stop in stops)

    def _generate_ids(self, prompts, max_new_tokens: int, options: dict, stops: list[str]) -> list[list[int]]:
        """Each prompt's new ids (max_new_tokens of them, pad after a row's end)."""
        rows = list(prompts) + [prompts[0]] * (self._rows(len(prompts)) - len(prompts))
        length = _bucket(max(len(row) for row in rows), self.max_length - max_new_tokens)
        ids, mask = scoring.left_padded(rows, self.tokenizer.pad_token_id, length)
        extra = dict(options)
        do_sample = bool(extra.pop("do_sample", False))
        temperature = extra.pop("temperature", 0.0)
        if do_sample:
            extra.update(temperature=temperature, seed=self.seed)
        if stops:
            extra.update(stop_strings=stops, tokenizer=self.tokenizer)
        out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample, **extra)
        new = out[: len(prompts), ids.shape[1] :].tolist()
        pad = self.tokenizer.pad_token_id
        return [row + [pad] * (max_new_tokens - len(row)) for row in new]


def _load(pretrained: str, framework: str, dtype: Any, quantize: Any, adapter: Any):
    from opt_cli.frameworks import load_causal_lm
    from opt_core.tokenizer import OPTTokenizer

    options = {key: value for key, value in (("dtype", dtype), ("quantize", quantize), ("adapter", adapter)) if value}
    print(f"opt-lm: loading {pretrained} ({framework})", file=sys.stderr, flush=True)
    try:
        model = load_causal_lm(framework, pretrained, **options)
    except ValueError as error:  # OPTError is one; a bad dtype raises a plain ValueError naming it
        raise ConfigError(f"pretrained={pretrained}: {error}") from None
    return model, OPTTokenizer.from_pretrained(pretrained)


def _jitted_logits(model):
    """Flax: the forward pass compiled once per input shape (eager Flax compiles each operation per shape)."""
    import jax
    import numpy as np

    forward = jax.jit(model.model.__call__)
    return lambda ids, mask: np.asarray(forward(ids, mask, params=model.model.params).logits, dtype=np.float32)


def _bucket(length: int, cap: int, step: int = 16) -> int:
    """`length` rounded up to a multiple of `step` (at most `cap`): fewer shapes for Keras and Flax to trace and
    compile. Padding on the right of a scored row, or on the left of a prompt, leaves its real tokens' logits as
    they are."""
    return max(length, min(-(-length // step) * step, cap))


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
