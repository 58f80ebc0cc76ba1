"""Scoring text with a causal LM, framework-free: which tokens go in, which are scored, and their log-likelihood.

These are the rules of lm-evaluation-harness' HF backend (`lm_eval.models.huggingface.HFLM`), written once so that
the `opt-lm` backend of every framework (`opt_eval`) and `opt-lm score` (`opt_cli.main.score_text`) reproduce its
numbers:

- A (context, continuation) pair (split into tokens by lm_eval's own `TemplateLM`, which the backend inherits) that
  is longer than the model's window keeps its last `max_length + 1` tokens; the last token is not fed (`model_input`).
- A whole text (perplexity) is scored in rolling windows (`rolling_windows`): the first window is the prefix token
  then up to `max_length - 1` tokens and predicts them all; every later window is the `max_length` tokens ending just
  before its last prediction and predicts only tokens not predicted yet. Each token is predicted exactly once, with
  as much context as the window allows.

Every function takes token ids as lists and logits as numpy arrays; the frameworks only compute the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from opt_core.errors import ConfigError, InputError


def model_input(context_ids: Sequence[int], continuation_ids: Sequence[int], max_length: int) -> list[int]:
    """The ids fed to the model for a pair: left-truncated to `max_length + 1` tokens, the last one dropped (its
    logits would predict past the continuation). The last len(continuation_ids) positions' logits score it."""
    if not continuation_ids:
        raise InputError("the continuation tokenizes to no tokens: there is nothing to score")
    if len(continuation_ids) > max_length:
        raise InputError(
            f"the continuation has {len(continuation_ids)} tokens, more than max_length={max_length}: "
            "it cannot be scored in one window"
        )
    return [*context_ids, *continuation_ids][-(max_length + 1) :][:-1]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `ids` exactly once (lm_eval's rolling rule with one
    token of minimum context, made disjoint): feeding context + continuation[:-1] fits in `max_length` tokens.

    Args:
        ids: the text's token ids (all are predicted).
        prefix_id: the token that conditions the first prediction (OPT's `</s>`).
        max_length: tokens per forward pass, at least 1.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    ids = list(ids)
    first = ids[:max_length]
    windows = [([prefix_id], first)] if first else []
    end = len(first)
    while end < len(ids):
        stop = min(end + max_length, len(ids))
        # The window holds the max_length tokens before `stop`; the ones already predicted are its context.
        start = stop - max_length - 1
        windows.append((ids[start:end], ids[end:stop]))
        end = stop
    return windows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """... V logits -> log-probabilities over the last axis, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def continuation_score(logits: np.ndarray, input_length: int, continuation_ids: Sequence[int]) -> tuple[float, bool]:
    """(log-likelihood, is_greedy) of a continuation from one row's logits.

    Args:
        logits: T V logits of one row (right padding after `input_length` is ignored).
        input_length: the row's real tokens (`len(model_input(...))`).
        continuation_ids: the scored ids: the last len(continuation_ids) real positions predict them.
    """
    count = len(continuation_ids)
    scored = log_softmax(logits[input_length - count : input_length])  # C V
    targets = np.asarray(continuation_ids, dtype=np.int64)
    log_likelihood = float(scored[np.arange(count), targets].sum())
    return log_likelihood, bool((scored.argmax(axis=-1) == targets).all())


def right_padded(
    rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None, dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """B T ids and mask (int64 unless `dtype` says) from rows of different lengths, padded on the right to
    `length` (default the longest): a causal model's logits at real positions do not see what follows them."""
    length = max(len(row) for row in rows) if length is None else length
    ids = np.full((len(rows), length), pad_id, dtype=dtype)
    mask = np.zeros((len(rows), length), dtype=dtype)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """B T int64 ids and mask padded on the left to `length` (default the longest), as prompts for generation are."""
    length = max(len(row) for row in rows) if length is None else length
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask
