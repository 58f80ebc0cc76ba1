"""Picking the next token on the host, in numpy: the logits processors, the sampling warpers and logprobs.

The server's engine (`opt_serve.engine`) runs one row at a time through these, whatever framework computed the
logits, so a request decodes the same in torch, Keras and Flax. The processors are HF `generate`'s, in its order
(repetition penalty, no-repeat n-grams, the minimum length), then OpenAI's presence and frequency penalties and
`logit_bias`; the warpers are HF's (temperature, top-k, top-p), and a sampled token is drawn by inverse CDF from a
pre-drawn uniform, as every framework's `generate` draws it (`opt_core.generation.prepare_generation`).

Shapes: V vocab.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one completion picks its tokens and when it stops.

    Args:
        max_tokens: new tokens at most.
        temperature: 0 picks the most likely token (greedy); otherwise sampling at this temperature.
        top_p, top_k: the nucleus and top-k warpers (top_k=0: off); used only when sampling.
        presence_penalty, frequency_penalty: OpenAI's, over the tokens generated so far.
        repetition_penalty, no_repeat_ngram_size, min_new_tokens: HF's (generation_config.json), prompt included.
        logit_bias: token id -> a number added to its logit.
        eos_ids: tokens that end the completion (finish_reason "stop"); not part of its text.
        stop: strings that end the completion; the text stops before them.
        logprobs: how many most likely alternatives to report per token (None: no logprobs).
        echo: the prompt comes back in front of the completion.
        seed: seeds the sampling draws (None: fresh entropy).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    eos_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def draws(params: SamplingParams, copies: int) -> np.ndarray:
    """copies x max_tokens float32 uniforms in [0, 1): the same draws `generate(seed=...)` makes for
    num_return_sequences=copies, so choice j of a request samples as row j of that call."""
    return np.random.default_rng(params.seed).random((copies, params.max_tokens), dtype=np.float32)


def process_logits(logits: np.ndarray, prompt: list[int], output: list[int], params: SamplingParams) -> np.ndarray:
    """V float32 scores for the next token after prompt + output, with every processor the params ask for."""
    scores = logits.astype(np.float32, copy=True)
    sequence = prompt + output
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(sequence, dtype=np.int64))
        penalty = np.float32(params.repetition_penalty)
        scores[seen] = np.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
    if params.no_repeat_ngram_size > 0:
        scores[_banned_ngram_tokens(sequence, params.no_repeat_ngram_size)] = -np.inf
    if len(output) < params.min_new_tokens and params.eos_ids:
        scores[list(params.eos_ids)] = -np.inf
    if output and (params.presence_penalty or params.frequency_penalty):
        ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
        scores[ids] -= np.float32(params.presence_penalty) + np.float32(params.frequency_penalty) * counts
    for token, bias in params.logit_bias:
        scores[token] += np.float32(bias)
    return scores


def _banned_ngram_tokens(sequence: list[int], n: int) -> list[int]:
    """The tokens that would repeat an n-gram already in `sequence` (HF's no_repeat_ngram_size)."""
    if len(sequence) + 1 < n:
        return []
    prefix = tuple(sequence[len(sequence) - n + 1 :])
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n - 1]) == prefix]


def choose(scores: np.ndarray, params: SamplingParams, uniform: float) -> int:
    """The next token: the argmax when greedy, else an inverse-CDF draw from the warped distribution."""
    if params.greedy:
        return int(np.argmax(scores))
    scores = warp(scores, params)
    probs = np.exp(scores - scores.max())
    probs = probs / probs.sum()
    cdf = np.cumsum(probs, dtype=np.float64).astype(np.float32)  # V; accumulated in double, as torch's CPU cumsum
    pick = int(np.searchsorted(cdf, np.float32(uniform) * cdf[-1], side="right"))
    return min(pick, scores.shape[-1] - 1)


def warp(scores: np.ndarray, params: SamplingParams) -> np.ndarray:
    """HF's warpers in its order: temperature, top-k, top-p (at least one token is always kept)."""
    scores = scores / np.float32(params.temperature)
    if 0 < params.top_k < scores.shape[-1]:
        threshold = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < threshold, -np.inf, scores)
    if params.top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending
        probs = np.exp(scores[order] - scores[order][-1])
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= 1.0 - params.top_p
        remove[-1] = False
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    return scores


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """... V logits -> float64 log-probabilities (the model's own distribution, before any processor)."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


def top_alternatives(log_probs: np.ndarray, count: int) -> list[tuple[int, float]]:
    """The `count` most likely tokens of a V row of log-probabilities, most likely first."""
    if count <= 0:
        return []
    best = np.argpartition(-log_probs, count - 1)[:count]
    best = best[np.argsort(-log_probs[best], kind="stable")]
    return [(int(token), float(log_probs[token])) for token in best]
