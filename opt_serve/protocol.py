"""OpenAI's completions protocol, framework-free: the request's fields checked one by one, and the JSON objects the
server answers with (completions, streamed chunks, the `logprobs` object, models, errors).

The field names, types, ranges and defaults are those of OpenAI's API reference for `POST /v1/completions` (as
the `openai` Python client types them); a field of the wrong type or out of its range is answered with OpenAI's
error object naming it (`param`), HTTP 400. Defaults the request leaves open come from the model's
generation_config.json: greedy unless it says `do_sample`, its temperature, top_p and top_k when sampling, its
repetition penalty, n-gram ban, minimum and maximum new tokens, and its eos ids.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from opt_serve.sampling import SamplingParams

MAX_LOGPROBS = 5  # OpenAI's limit
MAX_STOP_STRINGS = 4  # OpenAI's limit
DEFAULT_MAX_TOKENS = 16  # OpenAI's default


class RequestError(Exception):
    """A request the server refuses: OpenAI's error object, with the field at fault as `param`.

    Args:
        message: what is wrong, naming the field and the value.
        param: the request field, or None.
        status: the HTTP status (400 unless said otherwise).
        code: OpenAI's error code, when it has one (e.g. "context_length_exceeded").
        kind: OpenAI's error type.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts: its model's name, vocabulary and positions, and the rows of one request."""

    model_name: str
    vocab_size: int
    max_length: int  # positions per row: prompt + max_tokens
    max_rows: int  # prompts x n in one request


@dataclasses.dataclass
class CompletionRequest:
    """A checked `POST /v1/completions` body. `prompts` are strings or lists of token ids."""

    prompts: list[str | list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool


KNOWN_FIELDS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}  # fmt: skip


def parse_completion_request(body: Any, limits: Limits, defaults) -> CompletionRequest:
    """Checks every field of a completions request; raises RequestError naming the first bad one.

    Args:
        body: the decoded JSON body.
        limits: the server's Limits.
        defaults: the model's GenerationConfig (generation_config.json).
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    fields = {key: value for key, value in body.items() if value is not None}
    _check_model(fields, limits)
    prompts = _prompts(fields, limits)
    n = _integer(fields, "n", 1, low=1)
    _check_unsupported(fields, n)
    stream = _boolean(fields, "stream", False)
    include_usage = _stream_options(fields, stream)
    params = _sampling_params(fields, defaults, limits)
    if len(prompts) * n > limits.max_rows:
        raise RequestError(
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions, more than the {limits.max_rows} "
            "this server runs in one batch: send fewer prompts or a smaller n",
            "n" if n > 1 else "prompt",
        )
    return CompletionRequest(prompts, params, n, stream, include_usage)


def _check_model(fields: dict, limits: Limits) -> None:
    model = fields.get("model")
    if model is None:
        raise RequestError("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise RequestError(f"model must be a string, got {_json_type(model)}", "model")
    if model != limits.model_name:
        raise RequestError(
            f"The model `{model}` does not exist: this server serves `{limits.model_name}`",
            "model",
            status=404,
            code="model_not_found",
        )


def _prompts(fields: dict, limits: Limits) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists -> a list of prompts."""
    prompt = fields.get("prompt")
    if prompt is None:
        raise RequestError("you must provide a prompt parameter", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(
            f"prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
            f"got {_json_type(prompt) if prompt != [] else 'an empty list'}",
            "prompt",
        )
    if all(_is_int(item) for item in prompt):
        return [_token_ids(prompt, limits)]
    if all(isinstance(item, str) for item in prompt):
        return list(prompt)
    if all(isinstance(item, list) for item in prompt):
        return [_token_ids(item, limits) for item in prompt]
    raise RequestError("prompt must not mix strings, token ids and lists of token ids", "prompt")


def _token_ids(ids: list, limits: Limits) -> list[int]:
    if not ids:
        raise RequestError("prompt holds an empty list of token ids", "prompt")
    bad = [i for i in ids if not _is_int(i) or not 0 <= i < limits.vocab_size]
    if bad:
        raise RequestError(
            f"prompt token ids must be integers in [0, {limits.vocab_size}) (the model's vocabulary), got {bad[0]!r}",
            "prompt",
        )
    return list(ids)


def _check_unsupported(fields: dict, n: int) -> None:
    best_of = _integer(fields, "best_of", n, low=1)
    if best_of != n:
        raise RequestError(f"best_of={best_of} is not supported: only best_of == n ({n})", "best_of")
    suffix = fields.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise RequestError(f"suffix must be a string, got {_json_type(suffix)}", "suffix")
    if suffix:
        raise RequestError("suffix is not supported: OPT has no insertion mode", "suffix")
    if "user" in fields and not isinstance(fields["user"], str):
        raise RequestError(f"user must be a string, got {_json_type(fields['user'])}", "user")


def _stream_options(fields: dict, stream: bool) -> bool:
    options = fields.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options can only be set when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError('stream_options must be an object like {"include_usage": true}', "stream_options")
    return _boolean(options, "include_usage", False, "stream_options.include_usage")


def _sampling_params(fields: dict, defaults, limits: Limits) -> SamplingParams:
    default_temperature = defaults.temperature if defaults.do_sample else 0.0
    temperature = _number(fields, "temperature", default_temperature, 0.0, 2.0)
    return SamplingParams(
        max_tokens=_integer(fields, "max_tokens", defaults.max_new_tokens or DEFAULT_MAX_TOKENS, low=1),
        temperature=temperature,
        top_p=_number(fields, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=defaults.top_k,
        presence_penalty=_number(fields, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(fields, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=defaults.repetition_penalty,
        no_repeat_ngram_size=defaults.no_repeat_ngram_size,
        min_new_tokens=defaults.min_new_tokens or 0,
        logit_bias=_logit_bias(fields, limits.vocab_size),
        eos_ids=tuple(defaults.eos_ids),
        stop=_stop(fields),
        logprobs=_integer(fields, "logprobs", None, low=0, high=MAX_LOGPROBS),
        echo=_boolean(fields, "echo", False),
        seed=_seed(fields),
    )


def _stop(fields: dict) -> tuple[str, ...]:
    stop = fields.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"stop must be a string or a list of strings, got {_json_type(stop)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    if "" in stops:
        raise RequestError("stop must not hold an empty string", "stop")
    return tuple(stops)


def _logit_bias(fields: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = fields.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise RequestError(f"logit_bias must be an object of token id -> bias, got {_json_type(bias)}", "logit_bias")
    out = []
    for key, value in bias.items():
        if not (key.isdigit() and int(key) < vocab_size):
            raise RequestError(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _seed(fields: dict) -> int | None:
    seed = _integer(fields, "seed", None)
    return None if seed is None else seed % 2**64  # numpy's generators take non-negative seeds


# ----- one field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else "null")


def _integer(fields: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = fields.get(name, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer, got {_json_type(value)} ({value!r})", name)
    if (low is not None and value < low) or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {rule}, got {value}", name)
    return value


def _number(fields: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = fields.get(name, default)
    if not _is_number(value):
        raise RequestError(f"{name} must be a number, got {_json_type(value)} ({value!r})", name)
    if value > high or value < low or (low_open and value == low):
        rule = f"in ({low}, {high}]" if low_open else f"between {low} and {high}"
        raise RequestError(f"{name} must be {rule}, got {value}", name)
    return float(value)


def _boolean(fields: dict, name: str, default: bool, label: str | None = None) -> bool:
    value = fields.get(name, default)
    label = label or name
    if not isinstance(value, bool):
        raise RequestError(f"{label} must be true or false, got {_json_type(value)} ({value!r})", label)
    return value


# ----- the prompt as the model sees it


@dataclasses.dataclass
class EncodedPrompt:
    """A prompt's ids for the model, the first one echoed back, and the text echoed."""

    ids: list[int]
    echo_from: int
    text: str


def encode_prompt(prompt: str | list[int], tokenizer, limits: Limits, max_tokens: int) -> EncodedPrompt:
    """A string gets `</s>` in front, as `generate`'s tokenizer gives it (not echoed); token ids run as given.
    Raises RequestError when the prompt, or the prompt with max_tokens, exceeds the model's positions."""
    if isinstance(prompt, str):
        encoded = EncodedPrompt(tokenizer.encode(prompt), 1, prompt)
    else:
        encoded = EncodedPrompt(prompt, 0, tokenizer.decode(prompt, skip_special_tokens=True))
    length = len(encoded.ids)
    if length >= limits.max_length:
        raise RequestError(
            f"This model's maximum context length is {limits.max_length} tokens, however your prompt is {length} "
            "tokens: shorten the prompt",
            "prompt",
            code="context_length_exceeded",
        )
    if length + max_tokens > limits.max_length:
        raise RequestError(
            f"This model's maximum context length is {limits.max_length} tokens, however you requested "
            f"{length + max_tokens} tokens ({length} in your prompt; {max_tokens} for the completion): lower "
            "max_tokens or shorten the prompt",
            "max_tokens",
            code="context_length_exceeded",
        )
    return encoded


# ----- responses


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def completion_object(request_id: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    """A `text_completion` object: the whole response, or one streamed chunk (same shape, as OpenAI's)."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def logprobs_object(entries) -> dict:
    """OpenAI's completions `logprobs`: parallel lists over the tokens (TokenLogprob entries)."""
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [entry.top for entry in entries],
        "text_offset": [entry.offset for entry in entries],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_name, created)]}


def model_card(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "opt-lm"}
