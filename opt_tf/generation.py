"""Decoding for the Keras models: prefill, one decode step, the logits processors and the loops, compiled with
`tf.function(jit_compile=True)`.

Siblings: `opt_torch/generation.py` (the reference: same function names, same order of operations) and
`opt_flax/generation.py`; the framework-free parts (GenerationConfig, lengths, seeded draws, streamers, stop strings)
live in `opt_core/generation.py`. The loops reproduce HF transformers' `generate`: the same logits processors in the
same order, the same stopping and padding rules, its vectorised beam search, and transformers 4.55's contrastive
search. `generate` returns what HF PyTorch's returns (prompt + new ids up to the step where the last row finished),
as a numpy int64 array.

Compilation: each strategy (`sample_or_greedy`, `contrastive_search`, `beam_search`) is one XLA program that runs the
prefill and then the whole decode loop as a `tf.while_loop` over the preallocated cache (beam search included); the
loop condition stops as soon as every row has finished and the host slices the buffer to the final length.
`opt_core.generation.DecodeOptions` carries the options: fields that shape the program (strategy switches, top_k,
n-gram size, beams, lengths) are Python values, and the model keeps one `tf.function` per combination of them;
numeric values (temperature, penalties, eos ids, min length) are tensors, so changing them reuses the compiled
program. `TRACES` counts the traces (a retrace means a recompile; tests use it) and `TRACE_SECONDS` their time in
Python (`benchmarks/first_call.py`). On CPU the programs read the dense kernels in the [out, in] layout XLA's
matrix-vector products prefer (`opt_tf.decode_layout`), refreshed before every call. An active LoRA adapter
(`opt_tf.lora`) applies in every program: the layout holds the adapted weights, and without a layout the layers add
the LoRA branch; a program is compiled per adapter state, never reused after `set_adapter`, `merge_adapter`,
`disable_adapters` and the like.

Host loops: `tf.py_function` / `tf.numpy_function` cannot run inside an XLA program, so the two features that need
Python between tokens, a streamer and stop strings (which need the tokenizer), run as a host loop of compiled steps
instead: the same start and step functions, each one XLA program, with the streamer fed and the stop strings checked
on the host after every step. Beam search does not stream (as opt_torch); with stop strings its step is split in two
programs around the host check of the candidates.

Shapes: B batch, K beams (or contrastive candidates), T0 prompt length, S max length (static cache size), M = S - T0
new tokens at most, V vocab, E final hidden size, n eos ids (padded with -1 to a multiple of 4).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import weakref
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from opt_core.generation import DecodeOptions, GenerationCall, GenerationConfig, prepare_generation
from opt_tf import lora
from opt_tf.decode_layout import DecodeLayout, dense_layers

TRACES: collections.Counter = collections.Counter()  # function name -> times traced (a retrace means a recompile)
TRACE_SECONDS: collections.Counter = collections.Counter()  # function name -> seconds its Python body spent tracing

NEG_INF = -float("inf")


# ----- the model calls: prefill and one decode step


def prefill(model, input_ids, attention_mask, cache):
    """Runs the prompt (B T0) into the static cache (`attention_mask` is B S); returns the last position's logits
    (B V), the final hidden states of every prompt position (B T0 E, after the final norm and project_out) and the
    cache."""
    out = model(
        input_ids, attention_mask=attention_mask, past_key_values=cache, output_hidden_states=True, logits_to_keep=1
    )
    return tf.cast(out.logits[:, -1], tf.float32), out.hidden_states[-1], out.past_key_values


def decode_step(model, tokens, attention_mask, cache):
    """One token per row (B 1) written at the cache's index; returns logits B V, last hidden B E and the cache.

    `attention_mask` (B S) already has the new token's slot set and nothing after it; the model derives the token's
    position from it (`opt_tf.modeling.make_position_ids`, which gathers at the cache index rather than slicing, so
    a program taking the index as an input compiles once for every index).
    """
    out = model(tokens, attention_mask=attention_mask, past_key_values=cache, output_hidden_states=True)
    return tf.cast(out.logits[:, -1], tf.float32), out.hidden_states[-1][:, -1], out.past_key_values


# ----- logits processors (HF's order: repetition penalty, no-repeat n-grams, min length; then the warpers)


def process_logits(scores, sequences, cur_len, options: DecodeOptions, first_real):
    """B V scores for the next token of `sequences[:, :cur_len]` (a B S buffer; cur_len is traced)."""
    if options.use_repetition_penalty:
        scores = repetition_penalty(scores, sequences, cur_len, first_real, options.repetition_penalty)
    if options.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, sequences, cur_len, options.no_repeat_ngram_size)
    is_eos = tf.reduce_any(tf.range(scores.shape[-1])[:, None] == options.eos_ids[None, :], axis=-1)  # V
    return tf.where(is_eos & (cur_len < options.min_length), NEG_INF, scores)


def warp_for_sampling(scores, options: DecodeOptions, min_tokens_to_keep: int = 1):
    # The temperature is a program input, and TF's XLA keeps `x / traced scalar` an IEEE division, bit-equal to
    # torch's (measured, TF 2.21); only a compile-time-constant divisor becomes a multiply by its reciprocal, which
    # differs in the last bit. (JAX's newer XLA rewrites the traced case too: opt_flax divides by an opaque array.)
    scores = scores / options.temperature
    if options.top_k:
        top_k = min(max(options.top_k, min_tokens_to_keep), scores.shape[-1])
        threshold = tf.math.top_k(scores, top_k).values[:, -1:]
        scores = tf.where(scores < threshold, NEG_INF, scores)
    if options.use_top_p:
        order = tf.argsort(scores, axis=-1, direction="ASCENDING", stable=True)
        cumulative = _cumsum_like_torch(tf.nn.softmax(tf.gather(scores, order, batch_dims=1), axis=-1))
        remove = cumulative <= options.top_p_threshold
        keep = tf.range(scores.shape[-1]) >= scores.shape[-1] - min_tokens_to_keep
        remove = remove & ~keep
        scores = tf.where(_scatter_rows(tf.zeros_like(remove), order, remove), NEG_INF, scores)
    return scores


def repetition_penalty(scores, sequences, cur_len, first_real, penalty):
    """HF's rule: seen tokens' scores are divided by the penalty (multiplied when negative); padding is ignored."""
    vocab = scores.shape[-1]
    positions = tf.range(sequences.shape[1])[None, :]
    in_row = (positions >= first_real[:, None]) & (positions < cur_len)
    ids = tf.where(in_row, sequences, vocab)  # left padding and unwritten slots -> a dummy id
    seen = _scatter_rows(tf.zeros((scores.shape[0], vocab + 1), tf.bool), ids, tf.ones_like(ids, tf.bool))
    penalised = tf.where(scores < 0, scores * penalty, scores / penalty)  # a traced divisor, as the temperature
    return tf.where(seen[:, :vocab], penalised, scores)


def no_repeat_ngram(scores, sequences, cur_len, n):
    """Forbids every token that would repeat an n-gram already in the row (prompt and padding included, as HF)."""
    length = sequences.shape[1]
    if n > length:
        return scores
    windows = tf.stack([sequences[:, j : length - n + 1 + j] for j in range(n)], axis=-1)  # B W n, W = S - n + 1
    # A gather, not tf.slice: XLA would compile tf.slice once per start value when cur_len is a program input.
    # With cur_len < n - 1 no window is complete, so nothing is banned whatever the clamped columns hold.
    prefix = tf.gather(sequences, tf.maximum(cur_len - n + 1 + tf.range(n - 1), 0), axis=1)  # B n-1: the last n-1
    complete = tf.range(windows.shape[1]) <= cur_len - n  # W: windows inside sequences[:, :cur_len]
    matches = tf.reduce_all(windows[:, :, :-1] == prefix[:, None, :], axis=-1) & complete  # B W
    last = tf.maximum(windows[:, :, -1], 0)  # beam buffers hold -1 beyond cur_len, in windows that never match
    banned = _scatter_rows(tf.zeros(scores.shape, tf.int32), last, tf.cast(matches, tf.int32), add=True)
    return tf.where(banned > 0, NEG_INF, scores)


def sample_from(scores, uniforms):
    """Inverse-CDF sampling with pre-drawn uniforms, so the three frameworks pick the same token."""
    cdf = _cumsum_like_torch(tf.nn.softmax(scores, axis=-1))  # B V
    # torch's searchsorted(right=True) on a sorted cdf: the count of entries <= the target.
    picks = tf.reduce_sum(tf.cast(cdf <= uniforms[:, None] * cdf[:, -1:], tf.int32), axis=-1)
    return tf.minimum(picks, scores.shape[-1] - 1)


def _cumsum_like_torch(probs):
    # torch's CPU cumsum accumulates float32 in double; so does this, so the two cdfs round alike.
    return tf.cast(tf.cumsum(tf.cast(probs, tf.float64), axis=-1), probs.dtype)


def _scatter_rows(target, columns, values, add=False):
    """target R C; columns, values R W: target[r, columns[r, w]] = values[r, w] (or += with add)."""
    rows = tf.broadcast_to(tf.range(tf.shape(columns)[0])[:, None], tf.shape(columns))
    indices = tf.stack([rows, columns], axis=-1)  # R W 2
    if add:
        return tf.tensor_scatter_nd_add(target, indices, values)
    return tf.tensor_scatter_nd_update(target, indices, values)  # duplicates write the same value


def _set_column(x, column, values):
    """x ... C with its last axis' `column` (traced) set to `values` (x without its last axis, or a scalar)."""
    hit = tf.range(x.shape[-1]) == column
    return tf.where(hit, tf.expand_dims(tf.cast(values, x.dtype), -1), x)


# ----- greedy and sampling


class DecodeState(NamedTuple):
    """The while_loop carry of greedy and sampled decoding."""

    cur_len: tf.Tensor  # () int32: positions of `sequences` filled so far; the cache's index is cur_len - 1
    sequences: tf.Tensor  # B S int32, pad-filled after cur_len
    mask: tf.Tensor  # B S int32: the attention mask over the cache slots
    cache: object  # KVCache: L of (k, v), each B S N H
    unfinished: tf.Tensor  # B bool
    first_real: tf.Tensor  # B int32: each row's first real prompt position
    uniforms: tf.Tensor  # B M float32: the sampling draws (zeros when greedy)


def _start(model, input_ids, attention_mask, max_length, fill):
    """Buffers for a loop: sequences B S (filled with `fill`), the mask over S slots, the cache; and the prefill."""
    batch, prompt = input_ids.shape
    tail = (batch, max_length - prompt)
    sequences = tf.concat([input_ids, tf.fill(tail, fill)], axis=1)  # B S
    mask = tf.concat([attention_mask, tf.zeros(tail, tf.int32)], axis=1)  # B S
    logits, hidden, cache = prefill(model, input_ids, mask, model.init_cache(batch, max_length))
    return sequences, mask, cache, logits, hidden


def _first_real(attention_mask):
    return tf.argmax(tf.cast(attention_mask != 0, tf.int32), axis=1, output_type=tf.int32)


def _record(state, tokens, options: DecodeOptions):
    """Writes one token per row at cur_len (pad for finished rows, as HF) and updates who finished."""
    tokens = tf.where(state.unfinished, tf.cast(tokens, tf.int32), options.pad_token_id)  # B
    unfinished = state.unfinished & ~tf.reduce_any(tokens[:, None] == options.eos_ids[None, :], axis=-1)
    sequences = _set_column(state.sequences, state.cur_len, tokens)
    return state._replace(cur_len=state.cur_len + 1, sequences=sequences, unfinished=unfinished)


def _running(state):
    return (state.cur_len < state.sequences.shape[1]) & tf.reduce_any(state.unfinished)


def _pick(state: DecodeState, logits, options: DecodeOptions):
    scores = process_logits(logits, state.sequences, state.cur_len, options, state.first_real)
    if options.do_sample:
        prompt = state.sequences.shape[1] - state.uniforms.shape[1]
        draws = tf.gather(state.uniforms, state.cur_len - prompt, axis=1)  # B
        tokens = sample_from(warp_for_sampling(scores, options), draws)
    else:
        tokens = tf.argmax(scores, axis=-1, output_type=tf.int32)
    return _record(state, tokens, options)


def _sample_start(model, options: DecodeOptions, input_ids, attention_mask, uniforms) -> DecodeState:
    """The prefill and the first token."""
    max_length = input_ids.shape[1] + uniforms.shape[1]
    sequences, mask, cache, logits, _ = _start(model, input_ids, attention_mask, max_length, options.pad_token_id)
    unfinished = tf.ones(input_ids.shape[:1], tf.bool)
    cur_len = tf.constant(input_ids.shape[1])
    state = DecodeState(cur_len, sequences, mask, cache, unfinished, _first_real(mask), uniforms)
    return _pick(state, logits, options)


def _sample_step(model, options: DecodeOptions, state: DecodeState) -> DecodeState:
    """Feeds the last token through the model and picks the next."""
    mask = _set_column(state.mask, state.cur_len - 1, 1)
    tokens = tf.gather(state.sequences, state.cur_len - 1, axis=1)[:, None]  # B 1
    logits, _, cache = decode_step(model, tokens, mask, state.cache)
    return _pick(state._replace(mask=mask, cache=cache), logits, options)


def sample_or_greedy(model, options: DecodeOptions, input_ids, attention_mask, uniforms):
    """Greedy or sampled decoding; returns the B S buffer and its filled length."""
    state = _sample_start(model, options, input_ids, attention_mask, uniforms)
    (state,) = tf.while_loop(_running, lambda s: (_sample_step(model, options, s),), (state,))
    return state.sequences, state.cur_len


# ----- contrastive search


class ContrastiveState(NamedTuple):
    """The while_loop carry of contrastive search: every row keeps K cache rows, one per candidate."""

    cur_len: tf.Tensor  # () int32; the cache's index is cur_len
    sequences: tf.Tensor  # B S int32
    mask: tf.Tensor  # B*K S int32
    cache: object  # KVCache with B*K rows
    unfinished: tf.Tensor  # B bool
    first_real: tf.Tensor  # B int32
    logits: tf.Tensor  # B V: the next token's logits
    context: tf.Tensor  # B S E: final hidden states of the positions so far
    context_mask: tf.Tensor  # B S int32: which context positions count (not padding, not yet written)


def _contrastive_start(model, options: DecodeOptions, input_ids, attention_mask, uniforms) -> ContrastiveState:
    """The prefill (once per row, then copied to the row's K candidates) and the first token."""
    (batch, prompt), top_k = input_ids.shape, options.top_k
    max_length = prompt + uniforms.shape[1]
    sequences, mask, cache, logits, hidden = _start(model, input_ids, attention_mask, max_length, options.pad_token_id)
    rows = tf.repeat(tf.range(batch), top_k)  # B*K: each candidate gets its own copy of the row's cache
    context = tf.concat([hidden, tf.zeros((batch, max_length - prompt, hidden.shape[-1]), hidden.dtype)], axis=1)
    state = ContrastiveState(
        cur_len=tf.constant(prompt),
        sequences=sequences,
        mask=tf.gather(mask, rows),
        cache=cache.reorder(rows),
        unfinished=tf.ones((batch,), tf.bool),
        first_real=_first_real(mask),
        logits=logits,
        context=context,
        context_mask=mask,
    )
    return _contrastive_step(model, options, state)


def _contrastive_step(model, options: DecodeOptions, state: ContrastiveState) -> ContrastiveState:
    batch, top_k, cur_len = state.sequences.shape[0], options.top_k, state.cur_len
    scores = process_logits(state.logits, state.sequences, cur_len, options, state.first_real)
    top_probs, top_ids = tf.math.top_k(tf.nn.softmax(scores, axis=-1), top_k)  # B K
    mask = _set_column(state.mask, cur_len, 1)
    all_logits, hidden, cache = decode_step(model, tf.reshape(top_ids, (-1, 1)), mask, state.cache)
    hidden = tf.reshape(hidden, (batch, top_k, -1))  # B K E
    selected = _rank_candidates(state.context, hidden, top_probs, state.context_mask, options)  # B
    state = _record(state, tf.gather(top_ids, selected, batch_dims=1), options)
    picked = tf.repeat(tf.range(batch) * top_k + selected, top_k)  # every candidate row continues the pick
    at_cur = (tf.range(state.context.shape[1]) == cur_len)[None, :, None]  # 1 S 1
    return state._replace(
        mask=mask,
        cache=cache.reorder(picked),
        logits=tf.gather(tf.reshape(all_logits, (batch, top_k, -1)), selected, batch_dims=1),
        context=tf.where(at_cur, tf.gather(hidden, selected, batch_dims=1)[:, None, :], state.context),
        context_mask=_set_column(state.context_mask, cur_len, 1),
    )


def _rank_candidates(context, candidates, probs, context_mask, options: DecodeOptions):
    """context B S E, candidates B K E, probs B K, context_mask B S -> the best candidate per row (B)."""
    context = context / tf.norm(context, axis=-1, keepdims=True)  # unwritten slots give NaN: masked below
    candidates = candidates / tf.norm(candidates, axis=-1, keepdims=True)
    cosine = tf.einsum("bke,bse->bks", candidates, context)  # B K S
    # torch adds finfo.min at masked positions, which rounds to finfo.min exactly; a select also drops the NaNs.
    cosine = tf.where(context_mask[:, None, :] > 0, cosine, cosine.dtype.min)
    penalty = tf.reduce_max(cosine, axis=-1)  # B K
    scores = options.one_minus_alpha * probs - options.alpha * tf.cast(penalty, probs.dtype)
    return tf.argmax(scores, axis=-1, output_type=tf.int32)


def contrastive_search(model, options: DecodeOptions, input_ids, attention_mask, uniforms):
    """Contrastive search as transformers 4.55 implements it: each step scores the top_k candidates by
    (1 - alpha) * probability - alpha * (max cosine similarity of the candidate's final hidden state to the
    context's), padded prompt positions excluded; the hidden states are taken after the final norm and project_out.
    Returns the B S buffer and its filled length.
    """
    state = _contrastive_start(model, options, input_ids, attention_mask, uniforms)
    (state,) = tf.while_loop(_running, lambda s: (_contrastive_step(model, options, s),), (state,))
    return state.sequences, state.cur_len


# ----- beam search


class BeamState(NamedTuple):
    """The while_loop carry of beam search (HF's vectorised algorithm)."""

    cur_len: tf.Tensor  # () int32
    running: tf.Tensor  # B K S int32: the live beams
    running_scores: tf.Tensor  # B K float32: their summed log-probabilities
    running_indices: tf.Tensor  # B K M int32: the flat beam row each step came from (-1 before it)
    finished: tf.Tensor  # B K S int32: the best finished hypotheses
    finished_scores: tf.Tensor  # B K float32: their length-penalised scores
    finished_indices: tf.Tensor  # B K M int32
    is_finished: tf.Tensor  # B K bool: which `finished` slots hold a real hypothesis
    improvable: tf.Tensor  # B 1 bool: can the running beams still beat the finished ones
    keep_going: tf.Tensor  # () bool: HF's loop condition
    mask: tf.Tensor  # B*K S int32
    cache: object  # KVCache with B*K rows
    first_real: tf.Tensor  # B*K int32


class BeamCandidates(NamedTuple):
    """One step's candidates: the best beams_to_keep (call it 2K) continuations of each row."""

    scores: tf.Tensor  # B 2K float32: summed log-probabilities
    sequences: tf.Tensor  # B 2K S int32
    indices: tf.Tensor  # B 2K M int32
    hits: tf.Tensor  # B 2K bool: the candidate ends here (eos, max length, or a stop string)


def _gather_beams(tensor, indices):
    """tensor B K' ..., indices B K -> B K ... (HF's _gather_beams)."""
    return tf.gather(tensor, indices, axis=1, batch_dims=1)


def _beam_start(model, options: DecodeOptions, input_ids, attention_mask, uniforms):
    """The prefill of every beam row (B*K T0) and the initial state; returns it and the next-token logits."""
    num_beams, (rows, prompt) = options.num_beams, input_ids.shape
    batch, max_length = rows // num_beams, prompt + uniforms.shape[1]
    _, mask, cache, logits, _ = _start(model, input_ids, attention_mask, max_length, options.beam_fill)
    fill = tf.fill((batch, num_beams, max_length - prompt), options.beam_fill)
    running = tf.concat([tf.reshape(input_ids, (batch, num_beams, prompt)), fill], axis=2)  # B K S
    no_indices = tf.fill((batch, num_beams, max_length - prompt), -1)
    initial_scores = tf.where(tf.range(num_beams) > 0, -1e9, 0.0)[None, :] + tf.zeros((batch, 1))
    state = BeamState(
        cur_len=tf.constant(prompt),
        running=running,
        running_scores=initial_scores,
        running_indices=no_indices,
        finished=running,
        finished_scores=tf.fill((batch, num_beams), -1e9),
        finished_indices=no_indices,
        is_finished=tf.zeros((batch, num_beams), tf.bool),
        improvable=tf.ones((batch, 1), tf.bool),
        keep_going=tf.constant(True),
        mask=mask,
        cache=cache,
        first_real=_first_real(mask),
    )
    return state, logits


def _beam_advance(model, state: BeamState):
    """Feeds each running beam's last token through the model: the state with its cache, and the logits."""
    tokens = tf.gather(state.running, state.cur_len - 1, axis=2)  # B K
    mask = _set_column(state.mask, state.cur_len - 1, 1)
    logits, _, cache = decode_step(model, tf.reshape(tokens, (-1, 1)), mask, state.cache)
    return state._replace(mask=mask, cache=cache), logits


def _beam_candidates(options: DecodeOptions, state: BeamState, logits) -> BeamCandidates:
    """HF's candidates: the top 2K of every beam's processed log-probabilities plus its score (logits B*K V)."""
    (batch, num_beams, length), cur_len = state.running.shape, state.cur_len
    prompt = length - state.running_indices.shape[2]
    flat = tf.reshape(state.running, (batch * num_beams, length))
    log_probs = process_logits(tf.nn.log_softmax(logits, axis=-1), flat, cur_len, options, state.first_real)
    vocab = log_probs.shape[-1]
    log_probs = tf.reshape(log_probs, (batch, num_beams, vocab)) + state.running_scores[:, :, None]
    log_probs = tf.reshape(log_probs, (batch, num_beams * vocab))
    topk_scores, topk_flat = tf.math.top_k(log_probs, options.beams_to_keep)  # B 2K
    topk_beams, new_tokens = topk_flat // vocab, topk_flat % vocab
    sequences = _set_column(_gather_beams(state.running, topk_beams), cur_len, new_tokens)
    origins = topk_beams + tf.range(batch)[:, None] * num_beams  # the flat row each candidate extends
    indices = _set_column(_gather_beams(state.running_indices, topk_beams), cur_len - prompt, origins)
    hits = tf.reduce_any(new_tokens[..., None] == options.eos_ids, axis=-1) | (cur_len + 1 >= length)
    return BeamCandidates(topk_scores, sequences, indices, hits)


def _beam_select(options: DecodeOptions, state: BeamState, candidates: BeamCandidates) -> BeamState:
    """HF's update: the running beams, the merged finished ones, the stopping test and the cache's reorder."""
    prompt = state.running.shape[2] - state.running_indices.shape[2]
    # The running beams: the best continuations that did not just finish.
    masked_scores = candidates.scores + tf.cast(candidates.hits, tf.float32) * -1.0e9
    keep = tf.math.top_k(masked_scores, options.num_beams).indices
    running_indices = _gather_beams(candidates.indices, keep)
    state = state._replace(
        running=_gather_beams(candidates.sequences, keep),
        running_scores=_gather_beams(masked_scores, keep),
        running_indices=running_indices,
    )
    state = _merge_finished(options, prompt, state, candidates)
    cur_len = state.cur_len + 1
    improvable = _still_improvable(options, prompt, state, cur_len)
    done_all = tf.reduce_all(state.is_finished) & options.stop_when_full
    row_of = tf.gather(running_indices, cur_len - 1 - prompt, axis=2)  # B K
    return state._replace(
        cur_len=cur_len,
        improvable=improvable,
        keep_going=tf.reduce_any(improvable) & ~done_all & ~tf.reduce_all(candidates.hits),
        cache=state.cache.reorder(tf.reshape(row_of, (-1,))),
    )


def _merge_finished(options: DecodeOptions, prompt, state: BeamState, candidates: BeamCandidates) -> BeamState:
    """The finished beams: merge in candidates among the top num_beams that just finished."""
    num_beams, cur_len = options.num_beams, state.cur_len
    just_finished = candidates.hits & (tf.range(candidates.hits.shape[1]) < num_beams)[None, :]
    final_scores = candidates.scores / tf.gather(options.length_divisors, cur_len + 1 - prompt)
    full = tf.reduce_all(state.is_finished, axis=-1, keepdims=True) & options.stop_when_full
    final_scores = final_scores + tf.cast(full, tf.float32) * -1.0e9 + tf.cast(~state.improvable, tf.float32) * -1.0e9
    final_scores = final_scores + tf.cast(~just_finished, tf.float32) * -1.0e9
    merged_scores = tf.concat((state.finished_scores, final_scores), axis=1)
    best = tf.math.top_k(merged_scores, num_beams).indices
    return state._replace(
        finished=_gather_beams(tf.concat((state.finished, candidates.sequences), axis=1), best),
        finished_scores=_gather_beams(merged_scores, best),
        finished_indices=_gather_beams(tf.concat((state.finished_indices, candidates.indices), axis=1), best),
        is_finished=_gather_beams(tf.concat((state.is_finished, just_finished), axis=1), best),
    )


def _still_improvable(options: DecodeOptions, prompt, state: BeamState, cur_len):
    """HF's early-stop heuristic: can the best running beam still beat the worst finished one?"""
    best_length = state.running.shape[2] - prompt if options.best_at_max_length else cur_len - prompt
    best_running = state.running_scores[:, :1] / tf.gather(options.length_divisors, best_length)
    worst = tf.reduce_min(state.finished_scores, axis=1, keepdims=True)
    worst_finished = tf.where(state.is_finished, worst, -1.0e9)
    return state.improvable & tf.reduce_any(best_running > worst_finished, axis=-1, keepdims=True)


def _beam_result(options: DecodeOptions, state: BeamState):
    """The best num_return_sequences hypotheses of each row ((B*R) S) and the length HF returns."""
    batch, _, length = state.finished.shape
    returned = options.num_return_sequences
    indices = tf.reshape(state.finished_indices[:, :returned], (batch * returned, -1))
    generated = tf.reduce_max(tf.reduce_sum(tf.cast(indices != -1, tf.int32), axis=1))
    prompt = length - indices.shape[1]
    return tf.reshape(state.finished[:, :returned], (batch * returned, length)), prompt + generated


def beam_search(model, options: DecodeOptions, input_ids, attention_mask, uniforms):
    """HF's vectorised beam search (transformers >= 4.50): same candidates, scores, stopping and output length.
    Returns the (B * num_return_sequences) S buffer and the final length."""
    state, logits = _beam_start(model, options, input_ids, attention_mask, uniforms)
    state = _beam_select(options, state, _beam_candidates(options, state, logits))

    def step(state):
        state, logits = _beam_advance(model, state)
        return (_beam_select(options, state, _beam_candidates(options, state, logits)),)

    running = lambda s: s.keep_going & (s.cur_len < s.running.shape[2])  # noqa: E731
    (state,) = tf.while_loop(running, step, (state,))
    return _beam_result(options, state)


LOOPS = {"sample": sample_or_greedy, "contrastive": contrastive_search, "beam": beam_search}
HOST_STEPS = {"sample": (_sample_start, _sample_step), "contrastive": (_contrastive_start, _contrastive_step)}


# ----- host loops of compiled steps (streamer, stop strings)


def _after_record(state, call: GenerationCall):
    """The host's part of a host loop step: feeds the streamer the new tokens and stops rows at a stop string."""
    cur_len = int(state.cur_len)
    if call.streamer is not None:
        call.streamer.put(state.sequences[:, cur_len - 1].numpy().astype(np.int64))
    if call.stop_strings is not None:
        stopped = call.stop_strings.stopped(state.sequences.numpy()[:, :cur_len])
        state = state._replace(unfinished=state.unfinished & ~tf.constant(stopped))
    return state


def _host_loop(programs, inputs, values, call: GenerationCall):
    """Greedy, sampling or contrastive search as a host loop of two compiled programs (the start and the step)."""
    start, step = programs
    state = _after_record(start(*inputs, values), call)
    while bool(_running(state)):
        state = _after_record(step(state, values), call)
    return state.sequences, state.cur_len


def _beam_host_loop(programs, inputs, values, call: GenerationCall):
    """Beam search with stop strings: each step's candidates are checked on the host before the selection."""
    start, select, advance = programs
    state, candidates = start(*inputs, values)
    while True:
        batch, width, length = candidates.sequences.shape
        rows = candidates.sequences.numpy().reshape(batch * width, length)[:, : int(state.cur_len) + 1]
        stopped = call.stop_strings.stopped(rows).reshape(batch, width)
        candidates = candidates._replace(hits=candidates.hits | tf.constant(stopped))
        state = select(state, candidates, values)
        if not (bool(state.keep_going) and int(state.cur_len) < length):
            return _beam_result(call.options, state)
        state, candidates = advance(state, values)


def _beam_first(model, options, input_ids, attention_mask, uniforms):
    state, logits = _beam_start(model, options, input_ids, attention_mask, uniforms)
    return state, _beam_candidates(options, state, logits)


def _beam_next(model, options, state):
    state, logits = _beam_advance(model, state)
    return state, _beam_candidates(options, state, logits)


def _beam_select_program(model, options, state, candidates):
    return _beam_select(options, state, candidates)


# ----- compiled programs, kept on the model


class _LayoutModel:
    """The model as the compiled programs call it: every call passes the decode layout explicitly (a Keras
    call-context argument that reaches each `OPTDense`; None: the stored kernels)."""

    def __init__(self, model, layout: DecodeLayout | None):
        self.model, self.layout = model, layout

    def __call__(self, *args, **kwargs):
        return self.model(*args, decode_layout=self.layout, **kwargs)

    def init_cache(self, batch_size: int, max_length: int):
        return self.model.init_cache(batch_size, max_length)


class _Program:
    """A callable object rather than a closure: TF's retracing warning counts traces per code object, so closures
    would add up every program's first trace into one false alarm."""

    def __init__(self, model, name: str, statics: DecodeOptions, body, layout: DecodeLayout | None):
        # A weak reference: the model keeps its programs, which must not keep it alive in turn.
        self.model, self.name, self.statics, self.body, self.layout = weakref.ref(model), name, statics, body, layout

    def __call__(self, *args):
        TRACES[self.name] += 1  # runs only while tracing
        start = time.perf_counter()
        options = dataclasses.replace(self.statics, **args[-1])  # the traced values in their fields
        outputs = self.body(_LayoutModel(self.model(), self.layout), options, *args[:-1])
        TRACE_SECONDS[self.name] += time.perf_counter() - start
        return outputs


class _Compiled:
    """What `generate` keeps on a model: its programs and its decode layout.

    A plain object, so neither Keras nor TF tracks what it holds (no tf.function in a SavedModel, no decode kernel in
    `model.weights`). Each program is one `tf.function(jit_compile=True)` per name and static options; TF's trace
    cache then keys it on the input shapes.
    """

    def __init__(self):
        self.programs: dict[tuple[str, DecodeOptions], tf.types.experimental.GenericFunction] = {}
        self.layout: DecodeLayout | None = None

    def layout_for(self, model, rows: int) -> DecodeLayout | None:
        """The [out, in] kernels, made or refreshed, where they pay for decode steps of `rows` rows (before any
        program runs or is traced); None where the programs read the stored kernels."""
        layers = dense_layers(model)
        if not DecodeLayout.pays(layers, rows):
            return None
        if self.layout is None:
            self.layout = DecodeLayout()
        self.layout.refresh(layers)
        return self.layout

    def program(self, model, name: str, statics: DecodeOptions, body, layout: DecodeLayout | None):
        """The compiled `body(model, options, *args)`; `args` end with the traced options' values. A trace holds
        the LoRA adapter state it saw (which adapter, enabled, merged: `opt_tf.lora.trace_key`), so each state
        gets its own program, and so does each choice of kernels (the layout or the stored)."""
        key = (name, statics, lora.trace_key(model), layout is not None)
        if key not in self.programs:
            program = _Program(model, name, statics, body, layout)
            # autograph=False: the bodies write their loops and branches as tf.while_loop / tf.cond, so converting
            # them only adds to the trace.
            self.programs[key] = tf.function(program, jit_compile=True, autograph=False)
        return self.programs[key]


# ----- generate


class GenerationMixin:
    """`generate()` for TFOPTForCausalLM, with HF's arguments and HF PyTorch's return value."""

    generation_config: GenerationConfig | None = None
    _compiled: _Compiled | None = None

    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        seed: int | None = None,
        tokenizer=None,
        **kwargs,
    ) -> np.ndarray:
        """Generates continuations; returns prompt + new ids (B*num_return_sequences, T0 + steps) as a numpy
        int64 array, as HF PyTorch's generate (not a padded buffer).

        Args:
            input_ids: B T0 prompt ids (numpy or tf; left-padded for batches of different lengths).
            attention_mask: B T0, 0 for padding; all ones when None.
            generation_config: defaults to the model's (generation_config.json, or the config's special ids).
            streamer: receives the prompt, then each new token (batch of one): `put(ids)`, then `end()`. Decoding
                then runs as a host loop of compiled steps. Refused with beam search (as opt_torch).
            seed: seeds the sampling draws (reproducible, and identical across the three frameworks).
            tokenizer: needed for `stop_strings` (checked on the host after each compiled step).
            **kwargs: GenerationConfig fields, e.g. max_new_tokens=50, do_sample=True, top_p=0.9.
        """
        call = prepare_generation(
            self, input_ids, attention_mask, generation_config, streamer, seed, tokenizer, **kwargs
        )
        if call.streamer is not None:
            call.streamer.put(call.input_ids)
        sequences, length = self._decode(call)
        if call.streamer is not None:
            call.streamer.end()
        return sequences.numpy()[:, : int(length)].astype(np.int64)

    def _decode(self, call: GenerationCall):
        """Runs the strategy: one compiled program, or a host loop of compiled steps for a streamer or stop strings."""
        if self._compiled is None:
            self._compiled = _Compiled()
        compiled, options = self._compiled, call.options
        layout = compiled.layout_for(self, call.step_rows)
        # A few eos ids more or less reuse the compiled programs: the ids are padded to a multiple of 4 with -1.
        n = len(options.eos_ids)
        eos_ids = np.pad(options.eos_ids, (0, max(4, -(-n // 4) * 4) - n), constant_values=-1)
        values = {name: tf.constant(value) for name, value in {**options.traced(), "eos_ids": eos_ids}.items()}
        inputs = (
            tf.constant(call.input_ids, tf.int32),
            tf.constant(call.attention_mask, tf.int32),
            tf.constant(call.uniforms, tf.float32),
        )
        statics, strategy = options.statics(), options.strategy
        if call.streamer is None and call.stop_strings is None:
            return compiled.program(self, strategy, statics, LOOPS[strategy], layout)(*inputs, values)
        if strategy == "beam":
            bodies = {"beam_first": _beam_first, "beam_select": _beam_select_program, "beam_next": _beam_next}
            programs = [compiled.program(self, name, statics, body, layout) for name, body in bodies.items()]
            return _beam_host_loop(programs, inputs, values, call)
        names = (f"{strategy}_start", f"{strategy}_step")
        programs = [
            compiled.program(self, name, statics, body, layout) for name, body in zip(names, HOST_STEPS[strategy])
        ]
        return _host_loop(programs, inputs, values, call)
