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
import math
import os
import queue
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from opt_core.errors import ConfigError, InputError
from opt_core.files import atomic_write_text, complete_interrupted_save
from opt_core.inputs import validate_inputs

GENERATION_CONFIG_NAME = "generation_config.json"
# Above this many parameter bytes, TF and Flax decode with the stored kernels rather than an [out, in] copy.
DECODE_LAYOUT_MAX_BYTES = 2 * 2**30


def decode_layout_pays(parameter_bytes: int, on_cpu: bool, rows: int) -> bool:
    """Whether TF and Flax decode with a transposed, [out, in] copy of the dense kernels, for decode steps of
    `rows` rows (`GenerationCall.step_rows`).

    XLA CPU's matrix-vector products read that layout faster, and only those. opt-125m greedy decode on this
    project's 2-core CPU (`python benchmarks/tf_step.py --batch B --layout copy|stored`, and `flax_step.py`), tokens/s
    with the copy against the stored kernels: at one row TF 78.8 against 51.9, Flax 71.6-76.3 against 64.1-69.7
    (three alternating runs); at two rows TF 56.2 against 106.7, Flax 78.0 against 104.8; at eight TF 189.9 against
    248.6, Flax 225.3 against 283.1, where XLA's matrix-matrix product wants the stored [in, out] kernels.
    Accelerators gain nothing, and doubling a large model's kernels costs more memory than the copy saves time.
    """
    return on_cpu and rows == 1 and parameter_bytes <= DECODE_LAYOUT_MAX_BYTES


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
        complete_interrupted_save(folder)  # a save killed after its commit point is finished first
        path = Path(folder) / GENERATION_CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deep
            raise ConfigError(f"{path} is not valid JSON: {type(error).__name__} {error}"[:300]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        config = cls.from_dict(data)
        try:
            config.validate(strategy=False)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        return config

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / GENERATION_CONFIG_NAME
        atomic_write_text(path, self.to_json_string())
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

    def validate(self, strategy: bool = True) -> None:
        """Raises ConfigError naming the first field whose type or value is wrong, or two fields that cannot go
        together, with the value. HF's rules where HF raises (`GenerationConfig.validate`, its logits processors);
        where HF only warns or ignores a value, it is refused too (the table in tests/test_bad_arguments.py).

        Args:
            strategy: also check that the options pick one decoding strategy this library runs (beam sampling and
                contrastive search with sampling or beams it does not). Loading a generation_config.json skips
                this, so that a file written for another library still loads; generate checks it.
        """
        self._validate_types()
        self._validate_ranges()
        self._validate_combinations()
        if strategy:
            self._validate_strategy()

    def _validate_types(self) -> None:
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
                raise ConfigError(f"GenerationConfig.{name} must be {_KIND_NAMES[kinds]}, got {value!r}")
        for name in ("eos_token_id", "stop_strings"):
            value = getattr(self, name)
            item = int if name == "eos_token_id" else str
            items = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(v, item) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"GenerationConfig.{name} must be one {item.__name__} or a list, got {value!r}")
        if not isinstance(self.early_stopping, bool) and self.early_stopping != "never":
            raise ConfigError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")

    def _validate_ranges(self) -> None:
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value!r}")
        for name, (allowed, rule) in _FLOAT_RULES.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and allowed(value)):
                raise ConfigError(f"{name} must be {rule}, got {value!r}")
        if self.do_sample and self.temperature == 0:
            raise ConfigError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature!r} "
                "(for greedy decoding, set do_sample=False)"
            )
        if self.stop_strings is not None and "" in _as_list(self.stop_strings):
            raise ConfigError(f"stop_strings must not hold '' (every text ends with it), got {self.stop_strings!r}")

    def _validate_combinations(self) -> None:
        low, high = self.min_new_tokens, self.max_new_tokens
        if low is not None and high is not None and low > high:
            raise ConfigError(f"min_new_tokens={low} is more than max_new_tokens={high}")
        if self.num_return_sequences > self.num_beams and not self.do_sample:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams}) "
                "for greedy and beam search"
            )

    def _validate_strategy(self) -> None:
        alpha, beams = f"penalty_alpha={self.penalty_alpha}", f"num_beams={self.num_beams}"
        contrastive = self.penalty_alpha is not None and self.penalty_alpha > 0
        unsupported = [  # (refused, first option, second option, why)
            (self.do_sample and self.num_beams > 1, "do_sample=True", beams, "beam sampling is not implemented"),
            (contrastive and self.do_sample, alpha, "do_sample=True", "contrastive search does not sample"),
            (contrastive and self.num_beams > 1, alpha, beams, "contrastive search keeps no beams"),
        ]
        for refused, first, second, why in unsupported:
            if refused:
                raise ConfigError(
                    f"{first} with {second} is not supported: {why}. Choose one strategy: greedy, sampling "
                    "(do_sample=True), beam search (num_beams > 1) or contrastive search (penalty_alpha > 0, top_k > 1)"
                )


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


_INT, _NUMBER, _BOOL = (int,), (int, float), (bool,)
_KIND_NAMES = {_INT: "an integer", _NUMBER: "a number", _BOOL: "true or false"}
_FIELD_TYPES = {  # the JSON types generation_config.json may give each field (None: unset, where allowed)
    **dict.fromkeys(("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "top_k"), _INT),
    **dict.fromkeys(("no_repeat_ngram_size", "num_return_sequences", "bos_token_id", "pad_token_id"), _INT),
    **dict.fromkeys(("temperature", "top_p", "repetition_penalty", "length_penalty", "penalty_alpha"), _NUMBER),
    **dict.fromkeys(("do_sample", "use_cache"), _BOOL),
}
_AT_LEAST = {  # the smallest value of each integer field (top_k=0 and no_repeat_ngram_size=0 turn them off)
    **dict.fromkeys(("max_new_tokens", "max_length", "num_beams", "num_return_sequences"), 1),
    **dict.fromkeys(("min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size"), 0),
}
_FLOAT_RULES = {  # each float field's allowed values (all finite), and the rule in words
    "temperature": (lambda t: t >= 0, "a finite number >= 0 (> 0 when sampling)"),
    "top_p": (lambda p: 0 < p <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda r: r > 0, "a finite number > 0"),
    "length_penalty": (lambda _: True, "a finite number"),
    "penalty_alpha": (lambda a: 0 <= a <= 1, "in [0, 1]"),
}


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Everything a decoding loop reads from one generate call, resolved once for every framework.

    The first fields (`TRACED`) are numbers a compiled loop takes as traced inputs, so changing them reuses the
    compiled program; the rest are Python values that shape the program (a compiler keys its cache on them).
    Options a strategy ignores are left at neutral values, so they never key a recompile.

    Shapes: B rows (after beam or return-sequence expansion), T0 prompt length, M new tokens at most, n eos ids.
    """

    eos_ids: np.ndarray  # n int32; empty: no stopping at eos
    pad_token_id: np.int32  # fills finished rows
    min_length: np.int32  # eos is forbidden while cur_len < min_length (prompt included)
    temperature: np.float32
    top_p_threshold: np.float32  # 1 - top_p, in float64 first as torch's python scalar is
    repetition_penalty: np.float32
    length_divisors: np.ndarray  # M+1 float32: t ** length_penalty for t new tokens (beam search)
    beam_fill: np.int32  # what beam buffers start with (HF's precedence of pad and eos)
    alpha: np.float32  # contrastive search's penalty_alpha
    one_minus_alpha: np.float32
    strategy: str  # "sample" (greedy included), "beam" or "contrastive"
    prompt_length: int  # T0
    max_length: int  # T0 + M: the static cache's size S
    max_new_tokens: int  # M
    do_sample: bool
    top_k: int  # the sampling warper's k, or the contrastive candidates
    use_top_p: bool
    use_repetition_penalty: bool
    no_repeat_ngram_size: int
    num_beams: int
    beams_to_keep: int  # beam search's candidates per row: max(2, 1 + eos ids) * num_beams
    num_return_sequences: int
    stop_when_full: bool  # beam search: early_stopping is True
    best_at_max_length: bool  # beam search: early_stopping "never" and length_penalty > 0
    check_stop_strings: bool
    stream: bool

    TRACED: ClassVar[tuple[str, ...]] = (
        "eos_ids",
        "pad_token_id",
        "min_length",
        "temperature",
        "top_p_threshold",
        "repetition_penalty",
        "length_divisors",
        "beam_fill",
        "alpha",
        "one_minus_alpha",
    )

    def traced(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.TRACED}

    def statics(self) -> DecodeOptions:
        """A copy with the traced fields set to None: hashable, the key of a compiled program."""
        return dataclasses.replace(self, **dict.fromkeys(self.TRACED))


def decode_options(
    config: GenerationConfig, batch_size: int, prompt_length: int, max_positions: int, stream: bool
) -> DecodeOptions:
    """Resolves HF's length rules and special ids for a batch of `batch_size` rows, checking them against the
    model's `max_positions`."""
    config.validate()
    max_length = _max_length(config, prompt_length, max_positions)
    min_length = config.min_length
    if config.min_new_tokens is not None:
        min_length = max(min_length, prompt_length + config.min_new_tokens)
    _check_min_length(config, prompt_length, max_length)
    eos_ids = config.eos_ids
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    strategy = decoding_strategy(config)
    sampling = config.do_sample and strategy == "sample"
    beams = strategy == "beam"
    alpha = config.penalty_alpha or 0.0
    max_new_tokens = max_length - prompt_length
    divisors = [1.0] + [float(t) ** config.length_penalty for t in range(1, max_new_tokens + 1)]
    return DecodeOptions(
        eos_ids=np.array(eos_ids, np.int32),
        pad_token_id=np.int32(pad),
        min_length=np.int32(min_length),
        temperature=np.float32(config.temperature),
        top_p_threshold=np.float32(1 - config.top_p),
        repetition_penalty=np.float32(config.repetition_penalty),
        length_divisors=np.array(divisors, np.float32),
        beam_fill=np.int32((config.pad_token_id or eos_ids[0]) if eos_ids else -1),  # HF's precedence, kept as is
        alpha=np.float32(alpha),
        one_minus_alpha=np.float32(1.0 - alpha),
        strategy=strategy,
        prompt_length=prompt_length,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        top_k=config.top_k if sampling or strategy == "contrastive" else 0,
        use_top_p=sampling and config.top_p < 1.0,
        use_repetition_penalty=config.repetition_penalty != 1.0,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        num_beams=config.num_beams if beams else 1,
        beams_to_keep=max(2, 1 + len(eos_ids)) * config.num_beams if beams else 0,
        num_return_sequences=config.num_return_sequences if beams else 1,
        stop_when_full=beams and config.early_stopping is True,
        best_at_max_length=beams and config.early_stopping == "never" and config.length_penalty > 0.0,
        check_stop_strings=bool(config.stop_strings),
        stream=stream and not beams,
    )


def _max_length(config: GenerationConfig, prompt_length: int, max_positions: int) -> int:
    """T0 + M: max_new_tokens wins over max_length, which counts the prompt and must leave room after it (HF's
    rule: it raises when the prompt is as long as max_length)."""
    if config.max_new_tokens is not None:
        max_length = prompt_length + config.max_new_tokens
    elif config.max_length <= prompt_length:
        raise ConfigError(
            f"max_length={config.max_length} leaves no room for new tokens after the prompt of {prompt_length} "
            "tokens (max_length counts the prompt): raise max_length, or set max_new_tokens"
        )
    else:
        max_length = config.max_length
    if max_length > max_positions:
        asked = (
            f"max_new_tokens={config.max_new_tokens} after the prompt of {prompt_length} tokens"
            if config.max_new_tokens is not None
            else f"max_length={config.max_length}"
        )
        raise ConfigError(
            f"{asked} reaches {max_length} tokens, more than the model's max_position_embeddings={max_positions}; "
            "lower max_new_tokens or max_length"
        )
    return max_length


def _check_min_length(config: GenerationConfig, prompt_length: int, max_length: int) -> None:
    """A minimum the call can never reach is refused (HF warns and stops at the maximum)."""
    if config.min_length > max_length:
        raise ConfigError(
            f"min_length={config.min_length} is more than max_length={max_length}, the most this call can reach "
            f"(prompt {prompt_length} + at most {max_length - prompt_length} new tokens)"
        )
    if config.min_new_tokens is not None and prompt_length + config.min_new_tokens > max_length:
        raise ConfigError(
            f"min_new_tokens={config.min_new_tokens} is more than the {max_length - prompt_length} new tokens "
            f"max_length={max_length} leaves after the prompt of {prompt_length}"
        )


@dataclasses.dataclass
class GenerationCall:
    """One `generate` call, set up: the expanded prompt, the options, the random draws and the host-side helpers.

    Args:
        config: the GenerationConfig in force (the model's, updated with the call's keywords).
        input_ids: B T0 int64 prompt ids, each row repeated num_beams (beam search) or num_return_sequences times.
        attention_mask: B T0 int64.
        options: the resolved `DecodeOptions`.
        uniforms: B M float32 draws in [0, 1) for sampling (zeros when not sampling).
        streamer: receives the prompt, then each new token; None when not given.
        stop_strings: a `StopStrings` checker, or None.
    """

    config: GenerationConfig
    input_ids: np.ndarray
    attention_mask: np.ndarray
    options: DecodeOptions
    uniforms: np.ndarray
    streamer: Any
    stop_strings: StopStrings | None

    @property
    def step_rows(self) -> int:
        """Rows each decode step computes: the expanded batch, times the candidates of contrastive search."""
        candidates = self.options.top_k if self.options.strategy == "contrastive" else 1
        return self.input_ids.shape[0] * candidates


def prepare_generation(
    model: Any,
    input_ids: Any,
    attention_mask: Any,
    generation_config: GenerationConfig | None = None,
    streamer: Any = None,
    seed: int | None = None,
    tokenizer: Any = None,
    /,
    **kwargs: Any,
) -> GenerationCall:
    """Everything `generate` does before its loop, for every framework: options, prompt checks and expansion,
    lengths, stop strings and the seeded draws. Arrays in and out are host numpy arrays.

    Every argument is checked here, before the model computes anything: a wrong one raises ConfigError (options,
    special ids, seed, streamer) or InputError (the prompt), naming it and its value.

    Args:
        model: the model: its `config` (special ids, max_position_embeddings, vocab) and its own
            `generation_config` (generation_config.json), if any.
        input_ids: B T0 prompt ids (or T0); a lone bos token when None.
        attention_mask: B T0, 0 for padding; all ones when None.
        generation_config: replaces the model's for this call.
        streamer, seed, tokenizer: as `generate`'s.
        **kwargs: GenerationConfig fields for this call; an unknown one raises, naming it.
    """
    model_config = model.config
    config = _call_config(model, generation_config, kwargs)
    config.validate()
    _check_call_arguments(config, streamer, seed, tokenizer)
    _check_special_ids(config, model_config.vocab_size)
    input_ids, attention_mask = _host_prompt(model_config, config, input_ids, attention_mask)
    expand = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    input_ids = np.repeat(input_ids.astype(np.int64), expand, axis=0)
    attention_mask = np.repeat(attention_mask.astype(np.int64), expand, axis=0)
    batch, prompt_length = input_ids.shape
    options = decode_options(
        config, batch, prompt_length, model_config.max_position_embeddings, stream=streamer is not None
    )
    uniforms = np.zeros((batch, options.max_new_tokens), np.float32)
    if config.do_sample:
        uniforms = np.random.default_rng(seed).random((batch, options.max_new_tokens), dtype=np.float32)
    stops = StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None
    return GenerationCall(
        config, input_ids, attention_mask, options, uniforms, streamer if options.stream else None, stops
    )


def _call_config(model: Any, generation_config: Any, kwargs: dict[str, Any]) -> GenerationConfig:
    """The GenerationConfig in force: the call's (or the model's, or the config's special ids), updated with the
    call's keywords."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ConfigError(
            f"generation_config must be a GenerationConfig, got a {type(generation_config).__name__}: "
            "GenerationConfig(**options), or pass the options as keywords"
        )
    model_generation_config = getattr(model, "generation_config", None)
    base = generation_config or model_generation_config or GenerationConfig.from_model_config(model.config)
    return base.updated(**kwargs)


def _check_call_arguments(config: GenerationConfig, streamer: Any, seed: Any, tokenizer: Any) -> None:
    """generate's own arguments, next to the options they go with."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}")
    if streamer is not None:
        if not all(callable(getattr(streamer, method, None)) for method in ("put", "end")):
            raise ConfigError(f"streamer must have put(ids) and end() methods; a {type(streamer).__name__} has not")
        if config.num_beams > 1:
            raise ConfigError(
                f"streamer with num_beams={config.num_beams} is not supported: beam search settles its text only at "
                "the end; pass streamer=None or num_beams=1"
            )
    if config.stop_strings and tokenizer is None:
        raise ConfigError(
            f"stop_strings={config.stop_strings!r} need the tokenizer: generate(..., tokenizer=tokenizer)"
        )


def _check_special_ids(config: GenerationConfig, vocab_size: int) -> None:
    """eos and pad ids are fed back to the model and returned: they must be rows of its embedding."""
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(config, name)
        bad = [i for i in _as_list(value) if not 0 <= i < vocab_size] if value is not None else []
        if bad:
            which = f" holds {bad[0]}, which" if isinstance(value, (list, tuple)) else ""
            raise ConfigError(
                f"{name}={value!r}{which} is outside the model's vocabulary: vocab_size={vocab_size}, "
                f"ids must be in [0, {vocab_size})"
            )


def _host_prompt(model_config, config: GenerationConfig, input_ids: Any, attention_mask: Any):
    """B T0 prompt ids and mask as checked host arrays; a lone bos token (the call's bos_token_id) when None."""
    if input_ids is None:
        bos = config.bos_token_id if config.bos_token_id is not None else model_config.bos_token_id
        if bos is None or not 0 <= bos < model_config.vocab_size:
            raise ConfigError(
                f"input_ids=None starts from bos_token_id={bos!r}, which is not an id of the model's vocabulary "
                f"(vocab_size={model_config.vocab_size}): pass input_ids or a bos_token_id"
            )
        input_ids = np.full((1, 1), bos, dtype=np.int64)
    input_ids = _host_array("input_ids", input_ids)
    attention_mask = (
        np.ones_like(input_ids) if attention_mask is None else _host_array("attention_mask", attention_mask)
    )
    if input_ids.ndim == 1 and attention_mask.ndim == 1:
        input_ids, attention_mask = input_ids[None], attention_mask[None]  # T0 -> 1 T0, as HF does
    elif input_ids.ndim == 1:
        input_ids = input_ids[None]
    validate_inputs(model_config, input_ids, attention_mask, None, 0, input_ids.shape)
    return input_ids, attention_mask


def _host_array(name: str, value: Any) -> np.ndarray:
    """A numpy array of `value` (numpy, a framework's host array, nested lists); ragged rows are named."""
    try:
        return np.asarray(value)
    except ValueError as error:  # numpy refuses rows of different lengths
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{name} cannot be read as an array: {error}") from None
        lengths = ", ".join(str(len(row)) if hasattr(row, "__len__") else "?" for row in value)
        raise InputError(
            f"{name} has rows of lengths {lengths}: pad them on the left to one length, with 0 at the padding "
            "in the attention_mask"
        ) from None


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


# ----- stop strings (host side)


class StopStrings:
    """Host-side check of HF's `stop_strings`: which rows' text now ends with one of them.

    Args:
        tokenizer: anything with `decode(ids)`.
        stop_strings: one string or a list.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        self.tokenizer = tokenizer
        self.strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def stopped(self, rows: np.ndarray) -> np.ndarray:
        """R T ids -> R bool, True where the row's text ends with a stop string."""
        rows = np.asarray(rows).tolist()
        return np.array([hits_stop_string(self.tokenizer, row, self.strings) for row in rows], dtype=bool)


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
