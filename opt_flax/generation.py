"""Decoding for the Flax models: prefill, one decode step, the logits processors and the loops, all under `jax.jit`.

Siblings: `opt_torch/generation.py` (the reference: same function names, same order of operations) and
`opt_tf/generation.py`; the framework-free parts (GenerationConfig, lengths, seeded draws, streamers, stop strings)
live in `opt_core/generation.py`. The loops reproduce HF transformers' `generate`: the same logits processors in the
same order, the same stopping and padding rules, its vectorised beam search, and transformers 4.55's contrastive
search.

Compilation: each strategy (`sample_or_greedy`, `contrastive_search`, `beam_search`) is one function that runs the
prefill and then the whole decode loop as a `lax.while_loop` over a preallocated cache (beam search included);
`generate` jits it once per model configuration and keeps it (`GenerationMixin._decoding_function`).
`opt_core.generation.prepare_generation` sets each call up; its `DecodeOptions` is registered here as a pytree
whose `TRACED` fields (temperature, penalties, eos ids, min length) are leaves, so changing them reuses the
compiled loop, and whose other fields (strategy switches, top_k, n-gram size, beams, the cache length S) are
static, so jit's cache is keyed by them and by the input shapes.
`TRACES` counts the traces (tests use it). The loop condition stops as soon as every row has finished; the host
then slices the buffer to the final length, so the result is never the preallocated buffer.

Host callbacks: the loops never return to Python between tokens, except for two features that need Python inside
the loop. A streamer gets each new token through an ordered `io_callback`; stop strings need the tokenizer, so each
step sends the sequences to the host (an ordered `io_callback` returning the stopped rows). Both are compiled in
only when asked for.

Shapes: B batch, K beams (or contrastive candidates), T0 prompt length, S max length (static cache size), M = S - T0
new tokens at most, V vocab, E final hidden size, n eos ids.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from opt_core import compile_cache
from opt_core.generation import DecodeOptions, GenerationConfig, StopStrings, prepare_generation
from opt_flax.cache import KVCache
from opt_flax.decode_layout import DecodeLayout

TRACES: collections.Counter = collections.Counter()  # loop name -> times traced (a retrace means a recompile)

NEG_INF = -float("inf")


# The options become a pytree: the TRACED fields are its leaves, the others its static (hashable) structure.
with contextlib.suppress(ValueError):  # already registered: this module was imported again
    jax.tree_util.register_dataclass(
        DecodeOptions,
        data_fields=list(DecodeOptions.TRACED),
        meta_fields=[f.name for f in dataclasses.fields(DecodeOptions) if f.name not in DecodeOptions.TRACED],
    )


# ----- the model calls: prefill and one decode step


def prefill(module, params, input_ids, attention_mask, cache):
    """Runs the prompt (B T0) into the static cache (`attention_mask` is B S); returns the last position's logits
    (B V), the final hidden states of every prompt position (B T0 E, after the final norm and project_out) and the
    cache."""
    out = module.apply(
        {"params": params},
        input_ids,
        attention_mask,
        past_key_values=cache,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].astype(jnp.float32), out.hidden_states[-1], out.past_key_values


def decode_step(module, params, tokens, attention_mask, cache):
    """One token per row (B 1) written at the cache's index; returns logits B V, last hidden B E and the cache."""
    out = module.apply({"params": params}, tokens, attention_mask, past_key_values=cache, output_hidden_states=True)
    return out.logits[:, -1].astype(jnp.float32), out.hidden_states[-1][:, -1], out.past_key_values


# ----- logits processors (HF's order: repetition penalty, no-repeat n-grams, min length; then the warpers)


def process_logits(scores, sequences, cur_len, options: DecodeOptions, first_real):
    """B V scores for the next token of `sequences[:, :cur_len]` (a B S buffer; cur_len is traced)."""
    if options.use_repetition_penalty:
        scores = repetition_penalty(scores, sequences, cur_len, first_real, options.repetition_penalty)
    if options.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, sequences, cur_len, options.no_repeat_ngram_size)
    is_eos = jnp.zeros(scores.shape[-1], bool).at[options.eos_ids].set(True)  # V
    return jnp.where(is_eos & (cur_len < options.min_length), NEG_INF, scores)


def warp_for_sampling(scores, options: DecodeOptions, min_tokens_to_keep: int = 1):
    scores = _divide(scores, options.temperature)
    if options.top_k:
        top_k = min(max(options.top_k, min_tokens_to_keep), scores.shape[-1])
        threshold = lax.top_k(scores, top_k)[0][..., -1:]
        scores = jnp.where(scores < threshold, NEG_INF, scores)
    if options.use_top_p:
        order = jnp.argsort(scores, axis=-1)  # ascending
        sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
        remove = (cumulative <= options.top_p_threshold).at[..., -min_tokens_to_keep:].set(False)
        rows = jnp.arange(scores.shape[0])[:, None]
        scores = jnp.where(jnp.zeros_like(remove).at[rows, order].set(remove), NEG_INF, scores)
    return scores


def repetition_penalty(scores, sequences, cur_len, first_real, penalty):
    """HF's rule: seen tokens' scores are divided by the penalty (multiplied when negative); padding is ignored."""
    batch, vocab = scores.shape
    positions = jnp.arange(sequences.shape[1])[None, :]
    in_row = (positions >= first_real[:, None]) & (positions < cur_len)
    ids = jnp.where(in_row, sequences, vocab)  # left padding and unwritten slots -> a dummy id
    seen = jnp.zeros((batch, vocab + 1), bool).at[jnp.arange(batch)[:, None], ids].set(True)[:, :vocab]
    penalised = jnp.where(scores < 0, scores * penalty, _divide(scores, penalty))
    return jnp.where(seen, penalised, scores)


def no_repeat_ngram(scores, sequences, cur_len, n):
    """Forbids every token that would repeat an n-gram already in the row (prompt and padding included, as HF)."""
    batch, length = sequences.shape
    if n > length:
        return scores
    windows = jnp.stack([sequences[:, j : length - n + 1 + j] for j in range(n)], axis=-1)  # B W n, W = S - n + 1
    # With cur_len < n - 1 the slice start clamps to 0, but then no window is complete, so nothing is banned.
    prefix = lax.dynamic_slice_in_dim(sequences, cur_len - n + 1, n - 1, axis=1)  # B n-1: the last n-1 tokens
    complete = jnp.arange(windows.shape[1]) <= cur_len - n  # W: windows inside sequences[:, :cur_len]
    matches = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & complete  # B W
    banned = jnp.zeros(scores.shape, jnp.int32).at[jnp.arange(batch)[:, None], windows[:, :, -1]].add(matches)
    return jnp.where(banned > 0, NEG_INF, scores)


def sample_from(scores, uniforms):
    """Inverse-CDF sampling with pre-drawn uniforms, so the three frameworks pick the same token."""
    cdf = jnp.cumsum(jax.nn.softmax(scores, axis=-1), axis=-1)  # B V
    # torch's searchsorted(right=True) on a sorted cdf: the count of entries <= the target.
    picks = jnp.sum(cdf <= uniforms[:, None] * cdf[:, -1:], axis=-1)
    return jnp.minimum(picks, scores.shape[-1] - 1)


def _divide(x, scalar):
    # JAX emits a true divide, but XLA's algebraic simplifier rewrites x / broadcast(s) as x * broadcast(1 / s)
    # (measured on CPU, jax 0.10: 9-33% of fp32 entries then differ from torch's IEEE division by one ulp, for
    # s = 0.7 .. 3; a barrier on the scalar alone does not stop it). Dividing by an opaque full-shape array keeps
    # the IEEE division, so penalties and temperature match torch and HF exactly.
    return x / lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(scalar, x.dtype), x.shape))


# ----- the loop states


@flax.struct.dataclass
class DecodeState:
    """The while_loop carry of greedy and sampled decoding."""

    cur_len: jax.Array  # () int32: positions of `sequences` filled so far; the cache's index is cur_len - 1
    sequences: jax.Array  # B S int32, pad-filled after cur_len
    mask: jax.Array  # B S int32: the attention mask over the cache slots
    cache: object  # KVCache: L of (k, v), each B S N H
    unfinished: jax.Array  # B bool


@flax.struct.dataclass
class ContrastiveState:
    """The while_loop carry of contrastive search: every row keeps K cache rows, one per candidate."""

    cur_len: jax.Array  # () int32; the cache's index is cur_len
    sequences: jax.Array  # B S int32
    mask: jax.Array  # B*K S int32
    cache: object  # KVCache with B*K rows
    unfinished: jax.Array  # B bool
    logits: jax.Array  # B V: the next token's logits
    context: jax.Array  # B S E: final hidden states of the positions so far
    context_mask: jax.Array  # B S int32: which context positions count (not padding, not yet written)


@flax.struct.dataclass
class BeamState:
    """The while_loop carry of beam search (HF's vectorised algorithm)."""

    cur_len: jax.Array  # () int32
    running: jax.Array  # B K S int32: the live beams
    running_scores: jax.Array  # B K float32: their summed log-probabilities
    running_indices: jax.Array  # B K M int32: the flat beam row each step came from (-1 before it)
    finished: jax.Array  # B K S int32: the best finished hypotheses
    finished_scores: jax.Array  # B K float32: their length-penalised scores
    finished_indices: jax.Array  # B K M int32
    is_finished: jax.Array  # B K bool: which `finished` slots hold a real hypothesis
    improvable: jax.Array  # B 1 bool: can the running beams still beat the finished ones
    keep_going: jax.Array  # () bool: HF's loop condition
    mask: jax.Array  # B*K S int32
    cache: object  # KVCache with B*K rows


# ----- host callbacks (streamer, stop strings), looked up by the call id the compiled loop carries

_HOST_CALLS: dict[int, _HostCall] = {}
_CALL_IDS = itertools.count()


@dataclasses.dataclass
class _HostCall:
    streamer: object
    stop_strings: StopStrings | None


def _stream_put(call_id, tokens) -> None:
    _HOST_CALLS[int(call_id)].streamer.put(np.asarray(tokens))


def _stopped_on_host(call_id, sequences, cur_len) -> np.ndarray:
    return _HOST_CALLS[int(call_id)].stop_strings.stopped(np.asarray(sequences)[:, : int(cur_len)])


@contextlib.contextmanager
def _host_call(streamer, stop_strings: StopStrings | None, prompt):
    """Registers one generate call for the loop's host callbacks (yields its id); streams the prompt and the end."""
    call_id = next(_CALL_IDS) % 2**31
    _HOST_CALLS[call_id] = _HostCall(streamer, stop_strings)
    try:
        if streamer is not None:
            streamer.put(prompt)
        yield call_id
        if streamer is not None:
            jax.effects_barrier()  # every ordered put has run
            streamer.end()
    finally:
        del _HOST_CALLS[call_id]


def _stopped(call_id, sequences, cur_len):
    """R S sequences, their length -> R bool, True where the text ends with a stop string (a host round trip)."""
    result = jax.ShapeDtypeStruct(sequences.shape[:1], jnp.bool_)
    return io_callback(_stopped_on_host, result, call_id, sequences, cur_len, ordered=True)


# ----- the loops


def _start(module, params, input_ids, attention_mask, options: DecodeOptions):
    """Buffers for a loop: sequences B S (pad-filled), the mask over S slots, the cache; and the prefill."""
    batch, prompt = input_ids.shape
    sequences = jnp.full((batch, options.max_length), options.pad_token_id, jnp.int32).at[:, :prompt].set(input_ids)
    mask = jnp.zeros((batch, options.max_length), jnp.int32).at[:, :prompt].set(attention_mask)
    cache = KVCache.create(module.config, batch, options.max_length, module.dtype)
    logits, hidden, cache = prefill(module, params, input_ids, mask, cache)
    return sequences, mask, cache, logits, hidden


def _record(state, tokens, options: DecodeOptions, call_id):
    """Writes one token per row at cur_len (pad for finished rows, as HF), streams it, updates who finished."""
    tokens = jnp.where(state.unfinished, tokens, options.pad_token_id).astype(jnp.int32)  # B
    sequences = lax.dynamic_update_slice_in_dim(state.sequences, tokens[:, None], state.cur_len, axis=1)
    if options.stream:
        io_callback(_stream_put, None, call_id, tokens, ordered=True)
    unfinished = state.unfinished & ~(tokens[:, None] == options.eos_ids[None, :]).any(-1)
    cur_len = state.cur_len + 1
    if options.check_stop_strings:
        unfinished &= ~_stopped(call_id, sequences, cur_len)
    return state.replace(cur_len=cur_len, sequences=sequences, unfinished=unfinished)


def _running(state) -> jax.Array:
    return (state.cur_len < state.sequences.shape[1]) & state.unfinished.any()


def sample_or_greedy(module, params, input_ids, attention_mask, uniforms, options: DecodeOptions, call_id):
    """Greedy or sampled decoding; returns the B S buffer and its filled length."""
    TRACES["sample_or_greedy"] += 1
    prompt = input_ids.shape[1]
    first_real = jnp.argmax(attention_mask != 0, axis=1)
    sequences, mask, cache, logits, _ = _start(module, params, input_ids, attention_mask, options)

    def pick(state, logits):
        scores = process_logits(logits, state.sequences, state.cur_len, options, first_real)
        if options.do_sample:
            draws = lax.dynamic_index_in_dim(uniforms, state.cur_len - prompt, axis=1, keepdims=False)  # B
            tokens = sample_from(warp_for_sampling(scores, options), draws)
        else:
            tokens = jnp.argmax(scores, axis=-1)
        return _record(state, tokens, options, call_id)

    def step(state):
        mask = state.mask.at[:, state.cur_len - 1].set(1)
        tokens = lax.dynamic_slice_in_dim(state.sequences, state.cur_len - 1, 1, axis=1)  # B 1
        logits, _, cache = decode_step(module, params, tokens, mask, state.cache)
        return pick(state.replace(mask=mask, cache=cache), logits)

    unfinished = jnp.ones(input_ids.shape[0], bool)
    state = pick(DecodeState(jnp.int32(prompt), sequences, mask, cache, unfinished), logits)
    state = lax.while_loop(_running, step, state)
    return state.sequences, state.cur_len


def contrastive_search(module, params, input_ids, attention_mask, uniforms, options: DecodeOptions, call_id):
    """Contrastive search as transformers 4.55 implements it: each step scores the top_k candidates by
    (1 - alpha) * probability - alpha * (max cosine similarity of the candidate's final hidden state to the
    context's), padded prompt positions excluded; the hidden states are taken after the final norm and project_out.
    """
    TRACES["contrastive_search"] += 1
    (batch, prompt), top_k, length = input_ids.shape, options.top_k, options.max_length
    sequences, mask, cache, logits, hidden = _start(module, params, input_ids, attention_mask, options)
    rows = jnp.repeat(jnp.arange(batch), top_k)  # B*K: each candidate gets its own copy of the row's cache
    context = jnp.zeros((batch, length, hidden.shape[-1]), hidden.dtype).at[:, :prompt].set(hidden)
    context_mask = jnp.zeros((batch, length), jnp.int32).at[:, :prompt].set(attention_mask)
    unfinished = jnp.ones(batch, bool)
    state = ContrastiveState(
        jnp.int32(prompt), sequences, mask[rows], cache.reorder(rows), unfinished, logits, context, context_mask
    )
    step = functools.partial(
        _contrastive_step, module, params, options, call_id, jnp.argmax(attention_mask != 0, axis=1).astype(jnp.int32)
    )
    state = lax.while_loop(_running, step, state)
    return state.sequences, state.cur_len


def _contrastive_step(module, params, options: DecodeOptions, call_id, first_real, state: ContrastiveState):
    batch, top_k, cur_len = state.sequences.shape[0], options.top_k, state.cur_len
    scores = process_logits(state.logits, state.sequences, cur_len, options, first_real)
    top_probs, top_ids = lax.top_k(jax.nn.softmax(scores, axis=-1), top_k)  # B K
    mask = state.mask.at[:, cur_len].set(1)
    all_logits, hidden, cache = decode_step(module, params, top_ids.reshape(-1, 1), mask, state.cache)
    hidden = hidden.reshape(batch, top_k, -1)  # B K E
    selected = _rank_candidates(state.context, hidden, top_probs, state.context_mask, options)  # B
    rows = jnp.arange(batch)
    state = _record(state, top_ids[rows, selected], options, call_id)
    picked = jnp.repeat(rows * top_k + selected, top_k)  # every candidate row continues the pick
    return state.replace(
        mask=mask,
        cache=cache.reorder(picked),
        logits=all_logits.reshape(batch, top_k, -1)[rows, selected],
        context=state.context.at[:, cur_len].set(hidden[rows, selected]),
        context_mask=state.context_mask.at[:, cur_len].set(1),
    )


def _rank_candidates(context, candidates, probs, context_mask, options: DecodeOptions):
    """context B S E, candidates B K E, probs B K, context_mask B S -> the best candidate per row (B)."""
    context = context / jnp.linalg.norm(context, axis=-1, keepdims=True)  # unwritten slots give NaN: masked below
    candidates = candidates / jnp.linalg.norm(candidates, axis=-1, keepdims=True)
    cosine = jnp.einsum("bke,bse->bks", candidates, context)  # B K S
    # torch adds finfo.min at masked positions, which rounds to finfo.min exactly; a select also drops the NaNs.
    cosine = jnp.where(context_mask[:, None, :] > 0, cosine, jnp.finfo(cosine.dtype).min)
    penalty = cosine.max(axis=-1)  # B K
    return jnp.argmax(options.one_minus_alpha * probs - options.alpha * penalty, axis=-1)


def _gather_beams(tensor, indices):
    """tensor B K' ..., indices B K -> B K ... (HF's _gather_beams)."""
    return jax.vmap(lambda t, i: t[i])(tensor, indices)


def beam_search(module, params, input_ids, attention_mask, uniforms, options: DecodeOptions, call_id):
    """HF's vectorised beam search (transformers >= 4.50): same candidates, scores, stopping and output length.
    Returns the (B * num_return_sequences) S buffer and the final length."""
    TRACES["beam_search"] += 1
    num_beams, (rows, prompt), length = options.num_beams, input_ids.shape, options.max_length
    batch, new = rows // num_beams, length - prompt
    _, mask, cache, logits, _ = _start(module, params, input_ids, attention_mask, options)
    running = jnp.full((batch, num_beams, length), options.beam_fill, jnp.int32)
    running = running.at[:, :, :prompt].set(input_ids.reshape(batch, num_beams, prompt))
    no_indices = jnp.full((batch, num_beams, new), -1, jnp.int32)
    state = BeamState(
        cur_len=jnp.int32(prompt),
        running=running,
        running_scores=jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(-1e9),
        running_indices=no_indices,
        finished=running,
        finished_scores=jnp.full((batch, num_beams), -1e9, jnp.float32),
        finished_indices=no_indices,
        is_finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        keep_going=jnp.array(True),
        mask=mask,
        cache=cache,
    )
    update = functools.partial(_beam_update, options, call_id, jnp.argmax(attention_mask != 0, axis=1), prompt)

    def step(state):
        tokens = lax.dynamic_index_in_dim(state.running, state.cur_len - 1, axis=2, keepdims=False)  # B K
        mask = state.mask.at[:, state.cur_len - 1].set(1)
        logits, _, cache = decode_step(module, params, tokens.reshape(-1, 1), mask, state.cache)
        return update(state.replace(mask=mask, cache=cache), logits)

    state = lax.while_loop(lambda s: s.keep_going & (s.cur_len < length), step, update(state, logits))
    returned = options.num_return_sequences
    indices = state.finished_indices[:, :returned].reshape(batch * returned, new)
    generated = jnp.max(jnp.sum(indices != -1, axis=1))
    return state.finished[:, :returned].reshape(batch * returned, length), prompt + generated


def _beam_update(options: DecodeOptions, call_id, first_real, prompt, state: BeamState, logits) -> BeamState:
    """One step of HF's beam search, from the running beams' next-token logits (B*K V)."""
    (batch, num_beams, length), cur_len = state.running.shape, state.cur_len
    flat = state.running.reshape(batch * num_beams, length)
    log_probs = process_logits(jax.nn.log_softmax(logits, axis=-1), flat, cur_len, options, first_real)
    vocab = log_probs.shape[-1]
    log_probs = (log_probs.reshape(batch, num_beams, vocab) + state.running_scores[:, :, None]).reshape(batch, -1)
    topk_scores, topk_flat = lax.top_k(log_probs, options.beams_to_keep)  # B 2K
    topk_beams, new_tokens = topk_flat // vocab, topk_flat % vocab
    topk_sequences = _gather_beams(state.running, topk_beams).at[:, :, cur_len].set(new_tokens)
    origins = topk_beams + jnp.arange(batch)[:, None] * num_beams  # the flat row each candidate extends
    topk_indices = _gather_beams(state.running_indices, topk_beams).at[:, :, cur_len - prompt].set(origins)
    hits = (new_tokens[..., None] == options.eos_ids).any(-1) | (cur_len + 1 >= length)
    if options.check_stop_strings:
        hits |= _stopped(call_id, topk_sequences.reshape(-1, length), cur_len + 1).reshape(hits.shape)
    # The running beams: the best continuations that did not just finish.
    masked_scores = topk_scores + hits.astype(jnp.float32) * -1.0e9
    keep = lax.top_k(masked_scores, num_beams)[1]
    running_indices = _gather_beams(topk_indices, keep)
    state = state.replace(
        running=_gather_beams(topk_sequences, keep),
        running_scores=_gather_beams(masked_scores, keep),
        running_indices=running_indices,
    )
    state = _merge_finished(options, prompt, state, topk_scores, topk_sequences, topk_indices, hits)
    cur_len = cur_len + 1
    improvable = _still_improvable(options, prompt, state, cur_len)
    done_all = state.is_finished.all() & options.stop_when_full
    row_of = lax.dynamic_index_in_dim(running_indices, cur_len - 1 - prompt, axis=2, keepdims=False)  # B K
    return state.replace(
        cur_len=cur_len,
        improvable=improvable,
        keep_going=improvable.any() & ~done_all & ~hits.all(),
        cache=state.cache.reorder(row_of.reshape(-1)),
    )


def _merge_finished(options, prompt, state: BeamState, topk_scores, topk_sequences, topk_indices, hits):
    """The finished beams: merge in candidates among the top num_beams that just finished."""
    num_beams, cur_len = options.num_beams, state.cur_len
    just_finished = hits & (jnp.arange(hits.shape[1]) < num_beams)[None, :]
    final_scores = _divide(topk_scores, options.length_divisors[cur_len + 1 - prompt])
    full = state.is_finished.all(axis=-1, keepdims=True) & options.stop_when_full
    final_scores = final_scores + full.astype(jnp.float32) * -1.0e9 + (~state.improvable).astype(jnp.float32) * -1.0e9
    final_scores = final_scores + (~just_finished).astype(jnp.float32) * -1.0e9
    merged_scores = jnp.concatenate((state.finished_scores, final_scores), axis=1)
    best = lax.top_k(merged_scores, num_beams)[1]
    return state.replace(
        finished=_gather_beams(jnp.concatenate((state.finished, topk_sequences), axis=1), best),
        finished_scores=_gather_beams(merged_scores, best),
        finished_indices=_gather_beams(jnp.concatenate((state.finished_indices, topk_indices), axis=1), best),
        is_finished=_gather_beams(jnp.concatenate((state.is_finished, just_finished), axis=1), best),
    )


def _still_improvable(options, prompt, state: BeamState, cur_len):
    """HF's early-stop heuristic: can the best running beam still beat the worst finished one?"""
    best_length = options.max_length - prompt if options.best_at_max_length else cur_len - prompt
    best_running = _divide(state.running_scores[:, :1], options.length_divisors[best_length])
    worst = jnp.min(state.finished_scores, axis=1, keepdims=True)
    worst_finished = jnp.where(state.is_finished, worst, -1.0e9)
    return state.improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)


LOOPS = {"sample": sample_or_greedy, "contrastive": contrastive_search, "beam": beam_search}
_DECODING_FUNCTIONS: dict[tuple, object] = {}  # (strategy, module class, config, dtypes) -> the jitted loop


def _use_persistent_cache() -> None:
    """Keeps compiled decoding loops on disk between processes (`opt_core.compile_cache`), unless the user set
    JAX's cache folder already: a second process's first `generate` then loads instead of compiling."""
    folder = compile_cache.cache_folder("jax")
    if folder is not None and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(folder))


class GenerationMixin:
    """`generate()` for FlaxOPTForCausalLM, with HF's arguments and HF PyTorch's return value."""

    generation_config: GenerationConfig | None = None

    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        seed: int | None = None,
        tokenizer=None,
        params=None,
        **kwargs,
    ) -> np.ndarray:
        """Generates continuations; returns prompt + new ids (B*num_return_sequences, T0 + steps) as a numpy
        int64 array, as HF PyTorch's generate (not HF Flax's padded buffer).

        Args:
            input_ids: B T0 prompt ids (numpy or jax; left-padded for batches of different lengths).
            attention_mask: B T0, 0 for padding; all ones when None.
            generation_config: defaults to the model's (or the config's special ids).
            streamer: receives the prompt, then each new token (batch of one): `put(ids)`, then `end()`; the
                tokens come from inside the compiled loop through an ordered `io_callback`. A streamer with beam
                search is refused (it settles its text only at the end), as in every framework.
            seed: seeds the sampling draws (reproducible, and identical across the three frameworks).
            tokenizer: needed for `stop_strings` (checked on the host at each step).
            params: the params pytree; `self.params` when None.
            **kwargs: GenerationConfig fields, e.g. max_new_tokens=50, do_sample=True, top_p=0.9.
        """
        call = prepare_generation(
            self, input_ids, attention_mask, generation_config, streamer, seed, tokenizer, **kwargs
        )
        run = self._decoding_function(call.options.strategy)
        params = self._decode_params(self.params if params is None else params, call.step_rows)
        input_ids, attention_mask = call.input_ids.astype(np.int32), call.attention_mask.astype(np.int32)
        with _host_call(call.streamer, call.stop_strings, input_ids) as call_id:
            result = run(params, input_ids, attention_mask, call.uniforms, call.options, np.int32(call_id))
            sequences, length = jax.device_get(result)
        return np.asarray(sequences[:, : int(length)], dtype=np.int64)

    def _decode_params(self, params, rows: int):
        """The params `generate` decodes with, for decode steps of `rows` rows: `opt_flax.decode_layout`'s [out, in]
        view where it pays, kept on the model while the same arrays are passed; an active LoRA adapter applied either
        way (merged into the view)."""
        if getattr(self, "_decode_layout", None) is None:
            self._decode_layout = DecodeLayout()
        return self._decode_layout.params_for(params, rows)

    def _decoding_function(self, strategy: str):
        """The jitted loop, made once per strategy and model configuration (so a reloaded model reuses it): jit's
        own cache then keys compilations on the input shapes and the static fields of DecodeOptions."""
        key = (strategy, type(self.module), self.config.to_json_string(), str(self.dtype), str(self.param_dtype))
        _use_persistent_cache()
        if key not in _DECODING_FUNCTIONS:
            _DECODING_FUNCTIONS[key] = jax.jit(functools.partial(LOOPS[strategy], self.module))
        return _DECODING_FUNCTIONS[key]
