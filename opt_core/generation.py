"""The framework-free parts of decoding: `GenerationConfig`, streamers, and the host-side bookkeeping every
framework's `generate` shares (lengths, special ids, the seeded random draws, stop strings).

Siblings: `opt_torch/generation.py`, `opt_tf/generation.py`, `opt_flax/generation.py` run the decoding loops.

Semantics follow HF transformers' `generate`: `max_new_tokens` wins over `max_length` (which counts the prompt);
rows that finish are padded with `pad_token_id`; decoding stops when every row has finished, and the result ends at
that step (never a preallocated buffer). Sampling draws its uniforms from one seeded numpy source before the loop,
so a sampled run is reproducible and the three frameworks pick the same tokens from the same probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.errors import ConfigError

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclasses.dataclass
class GenerationConfig:
    """Decoding options with HF's `generation_config.json` keys and defaults.

    Args:
        max_length: total length (prompt included) when max_new_tokens is not given.
        max_new_tokens: new tokens to generate at most; wins over max_length.
        min_length / min_new_tokens: eos is forbidden before these lengths.
        do_sample: sample instead of picking the most likely token.
        num_beams: beam search when > 1.
        temperature, top_k, top_p: sampling warpers, applied in that order (top_k=50 by default, as HF).
        repetition_penalty: > 1 discourages tokens already in the sequence (left padding excluded).
        no_repeat_ngram_size: forbids repeating any n-gram of this size.
        length_penalty, early_stopping, num_return_sequences: beam search options.
        penalty_alpha: contrastive search's degeneration penalty (with top_k > 1).
        eos_token_id: one id or a list; None disables stopping at eos.
        pad_token_id: fills finished rows; defaults to the first eos id when unset.
        stop_strings: stop a row once its text ends with one of these (needs a tokenizer).
        extra: every other key of generation_config.json, kept for the round trip.
    """

    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    penalty_alpha: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        """Special ids from the model's OPTConfig, as HF does when a folder has no generation_config.json."""
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> GenerationConfig:
        path = Path(folder) / GENERATION_CONFIG_NAME
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / GENERATION_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def updated(self, **kwargs: Any) -> GenerationConfig:
        """A copy with keyword overrides applied; unknown keywords raise, naming them."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"generate() got unknown options: {', '.join(unknown)}")
        return dataclasses.replace(self, **kwargs)

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def validate(self) -> None:
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ConfigError("num_beams and num_return_sequences must be at least 1")
        if self.num_return_sequences > self.num_beams and not self.do_sample:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams}) "
                "for greedy and beam search"
            )
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class DecodingPlan:
    """What a generate call needs before its loop: lengths, special ids and the random draws.

    Args:
        prompt_length: T0, the (padded) prompt length.
        max_length: T0 + the most new tokens; the static cache's size S.
        max_new_tokens: the number of decode steps at most.
        min_length: eos is forbidden while the sequence is shorter than this (prompt included).
        pad_token_id: fills finished rows.
        eos_ids: the ids that finish a row (possibly empty).
        uniforms: B x max_new_tokens draws in [0, 1) for sampling (None when not sampling).
    """

    prompt_length: int
    max_length: int
    max_new_tokens: int
    min_length: int
    pad_token_id: int
    eos_ids: tuple[int, ...]
    uniforms: np.ndarray | None


def plan_decoding(
    config: GenerationConfig, batch_size: int, prompt_length: int, max_positions: int, seed: int | None = None
) -> DecodingPlan:
    """Resolves HF's length rules and special ids, checks them against the model, and draws the uniforms."""
    config.validate()
    if config.max_new_tokens is not None:
        max_length = prompt_length + config.max_new_tokens
    else:
        max_length = max(config.max_length, prompt_length)
    min_length = config.min_length
    if config.min_new_tokens is not None:
        min_length = max(min_length, prompt_length + config.min_new_tokens)
    eos_ids = tuple(config.eos_ids)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if max_length > max_positions:
        raise ConfigError(
            f"generating up to {max_length} tokens (prompt {prompt_length} + new) exceeds the model's "
            f"max_position_embeddings={max_positions}; lower max_new_tokens or max_length"
        )
    uniforms = None
    if config.do_sample:
        uniforms = np.random.default_rng(seed).random((batch_size, max_length - prompt_length), dtype=np.float32)
    return DecodingPlan(prompt_length, max_length, max_length - prompt_length, min_length, pad, eos_ids, uniforms)


def load_generation_config(folder: str | os.PathLike, config) -> GenerationConfig:
    """generation_config.json when the folder has one, else the special ids of the model's config (as HF)."""
    if (Path(folder) / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)


def decoding_strategy(config: GenerationConfig) -> str:
    """ "beam", "contrastive" or "sample" (greedy included), chosen as HF's generate chooses."""
    if config.num_beams > 1:
        return "beam"
    if config.penalty_alpha is not None and config.penalty_alpha > 0 and config.top_k > 1:
        return "contrastive"
    return "sample"


def prompt_only(input_ids: np.ndarray, config: GenerationConfig, strategy: str) -> np.ndarray:
    """No room for new tokens: the prompt, one row per returned sequence (input rows already expanded)."""
    if strategy == "beam":
        batch = input_ids.shape[0] // config.num_beams
        input_ids = input_ids.reshape(batch, config.num_beams, -1)[:, : config.num_return_sequences]
        input_ids = input_ids.reshape(batch * config.num_return_sequences, -1)
    return input_ids.astype(np.int64)


# ----- stop strings (host side)


def hits_stop_string(tokenizer, token_ids: list[int], stop_strings: list[str]) -> bool:
    """Whether the text of `token_ids` ends with one of `stop_strings` (HF's StopStringCriteria semantics)."""
    longest = max(len(s) for s in stop_strings)
    # Decoding the last few tokens suffices: every token is at least one character long, except partial bytes.
    tail = tokenizer.decode(token_ids[-(longest + 4) :])
    return any(tail.endswith(s) for s in stop_strings)


# ----- streamers


class TextStreamer:
    """Prints text to stdout as it is generated, a word at a time (HF's TextStreamer).

    Args:
        tokenizer: anything with `decode(ids, **decode_kwargs)`.
        skip_prompt: do not print the prompt.
        **decode_kwargs: passed to decode, e.g. skip_special_tokens=True.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value) -> None:
        """Takes the prompt (first call) or the newest token(s) of a batch of one."""
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        value = value.reshape(-1)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(int(v) for v in value)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable, self.token_cache, self.print_len = text[self.print_len :], [], 0
        elif text and text.endswith("\ufffd"):
            printable = ""  # an incomplete UTF-8 sequence: wait for the rest of its bytes
        else:
            printable = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
        printable = text[self.print_len :]
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Yields text pieces from another thread's `generate` (HF's TextIteratorStreamer)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value == self.stop_signal:
            raise StopIteration()
        return value
