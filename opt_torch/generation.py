"""Decoding for the PyTorch models: prefill, one decode step (the unit `torch.compile` compiles), the loops.

Siblings: `opt_tf/generation.py`, `opt_flax/generation.py`; everything `generate` does before its loop (options,
lengths, special ids, prompt checks and expansion, seeded draws, stop strings) is `opt_core.generation.
prepare_generation`, and the loops read its `DecodeOptions`. The loops reproduce HF transformers' `generate`: the
same logits processors in the same order, the same stopping and padding rules, and its vectorised beam search.

Shapes: B batch, K beams, T0 prompt length, S static cache size (max length; rounded up for a compiled step,
`cache_slots`), M new tokens at most, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from opt_core.errors import ConfigError
from opt_core.generation import DecodeOptions, GenerationCall, GenerationConfig, StopStrings, prepare_generation
from opt_core.quantization import quantize_int8
from opt_torch.arrays import torch_to_numpy
from opt_torch.cache import StaticKVCache
from opt_torch.linear import pack_linears, packed_linears, weight_identity
from opt_torch.lora import LoraLinear
from opt_torch.quantization import PACK_MM_MULTIPLE, int8_linear

# ----- the model calls: prefill and one decode step


def prefill(model, input_ids, attention_mask, cache):
    """Runs the prompt (B T0) into the static cache; returns the last position's logits (B V) and the final
    hidden states of every prompt position (B T0 E, after the final norm and project_out)."""
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    hidden = model.model.decoder(
        input_ids, attention_mask, past_key_values=cache, use_cache=True, cache_position=slots
    ).last_hidden_state
    return lm_logits(model, hidden[:, -1]), hidden


def decode_step(model, tokens, attention_mask, cache, slot):
    """One token per row (B 1) written at `slot` (a 1-element tensor); returns logits B V and last hidden B E.

    Every call has the same shapes, so `torch.compile` compiles it once per (B, S).
    """
    hidden = model.model.decoder(
        tokens,
        attention_mask,
        past_key_values=cache,
        use_cache=True,
        cache_position=slot,
        validate=False,
        layer_regions=True,  # compiled: each layer one region (opt_torch.modeling.compiled_layer)
    ).last_hidden_state[:, -1]
    return lm_logits(model, hidden), hidden


# ----- logits processors (HF's order: repetition penalty, no-repeat n-grams, min length; then the warpers)


def process_logits(scores, sequences, cur_len, options: DecodeOptions, first_real):
    """B V scores for the next token of `sequences[:, :cur_len]`, with every processor the options ask for.

    The options' float32 numbers go in as Python floats: torch rounds a Python scalar to the scores' float32,
    so they compute exactly as HF's Python floats do."""
    if options.use_repetition_penalty:
        penalty = float(options.repetition_penalty)
        scores = repetition_penalty(scores, sequences[:, :cur_len], first_real, penalty)
    if options.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, sequences[:, :cur_len], options.no_repeat_ngram_size)
    if cur_len < options.min_length and len(options.eos_ids):
        scores = scores.clone()
        scores[:, options.eos_ids.tolist()] = -float("inf")
    return scores


def warp_for_sampling(scores, options: DecodeOptions, min_tokens_to_keep: int = 1):
    """HF's warpers in its order: temperature, top-k, top-p."""
    if options.temperature != 1.0:
        scores = scores / float(options.temperature)
    if options.top_k:
        top_k = min(max(options.top_k, min_tokens_to_keep), scores.shape[-1])
        threshold = torch.topk(scores, top_k).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if options.use_top_p:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= float(options.top_p_threshold)
        remove[..., -min_tokens_to_keep:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def repetition_penalty(scores, sequences, first_real, penalty):
    """HF's rule: seen tokens' scores are divided by the penalty (multiplied when negative); padding is ignored."""
    vocab = scores.shape[-1]
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    ids = sequences.masked_fill(positions[None, :] < first_real[:, None], vocab)  # left padding -> a dummy id
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device).scatter_(1, ids, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def no_repeat_ngram(scores, sequences, n):
    """Forbids every token that would repeat an n-gram already in the row (prompt and padding included, as HF)."""
    cur_len = sequences.shape[1]
    if cur_len + 1 < n:
        return scores
    if n == 1:
        banned = torch.zeros_like(scores, dtype=torch.int32).scatter_add_(
            1, sequences, torch.ones_like(sequences, dtype=torch.int32)
        )
        return scores.masked_fill(banned > 0, -float("inf"))
    windows = sequences.unfold(1, n, 1)  # B W n, W = cur_len - n + 1
    matches = (windows[:, :, :-1] == sequences[:, cur_len - n + 1 :][:, None, :]).all(-1)  # B W
    banned = torch.zeros_like(scores, dtype=torch.int32).scatter_add_(1, windows[:, :, -1], matches.int())
    return scores.masked_fill(banned > 0, -float("inf"))


def sample_from(scores, uniforms):
    """Inverse-CDF sampling with pre-drawn uniforms, so the three frameworks pick the same token."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)  # B V
    picks = torch.searchsorted(cdf, (uniforms[:, None] * cdf[:, -1:]).contiguous(), right=True)
    return picks.squeeze(-1).clamp(max=scores.shape[-1] - 1)


# ----- generate


class GenerationMixin:
    """`generate()` for OPTForCausalLM, with HF's arguments and return value."""

    generation_config: GenerationConfig | None = None

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        seed: int | None = None,
        tokenizer=None,
        compile: bool = False,
        **kwargs,
    ) -> torch.LongTensor:
        """Generates continuations; returns prompt + new ids (B*num_return_sequences, T0 + steps), as HF.

        Args:
            input_ids: B T0 prompt ids (left-padded for batches of different lengths).
            attention_mask: B T0, 0 for padding; all ones when None.
            generation_config: defaults to the model's (generation_config.json, or the config's special ids).
            streamer: receives the prompt, then each new token (batch of one): `put(ids)`, then `end()`; refused
                with beam search, which settles its text only at the end.
            seed: seeds the sampling draws (reproducible, and identical across the three frameworks).
            tokenizer: needed for `stop_strings`.
            compile: run the decode step through `torch.compile` (one compilation per batch size and cache length
                bucket, each decoder layer traced once); the layers' weights then get memory of their own instead
                of the checkpoint file's mapping (`own_storage_for_layers`).
            **kwargs: GenerationConfig fields, e.g. max_new_tokens=50, do_sample=True, top_p=0.9.
        """
        prompt, mask = _host(input_ids), _host(attention_mask)
        call = prepare_generation(self, prompt, mask, generation_config, streamer, seed, tokenizer, **kwargs)
        prepare_decoding(self, pack=not compile)
        with packed_linears():
            return LOOPS[call.options.strategy](self, self._step_function(compile), call)

    def _step_function(self, compile: bool):
        if not compile:
            return decode_step
        if getattr(self, "is_dispatched", False):  # accelerate's hooks run Python around every module
            raise ConfigError("compile=True needs a model on one device; this one was dispatched by device_map")
        own_storage_for_layers(self)
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(decode_step, dynamic=False, fullgraph=True)
        return self._compiled_step


def own_storage_for_layers(model) -> None:
    """Gives each decoder-layer tensor that is a view into a larger storage a storage of its own, in place (the same
    Parameter objects). A compiled step runs each layer as one nested compile region (`opt_torch.modeling.
    compiled_layer`), and torch.compile refuses a region whose inputs share a storage; a model loaded from
    safetensors has all its weights in one copy-on-write mapping of the file (`opt_torch.pretrained`). So a
    `compile=True` model holds its layers' weights in memory of its own, as eager decoding holds packed copies."""
    with torch.no_grad():
        for tensor in [*model.model.decoder.layers.parameters(), *model.model.decoder.layers.buffers()]:
            if type(tensor.data) is not torch.Tensor:  # a tensor subclass (DTensor) owns no plain storage
                continue
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


# A CPU decode step multiplies the LM head's weight W [V, E] by one row (or a few) of activations. MKL reads W faster
# when its memory holds W's transpose, [E, V] row by row (the same tensor [V, E], transposed strides): measured by
# `python benchmarks/linear_kernels.py` (torch 2.13, 2 cores), the tied 50272 x 768 head of opt-125m took 9.6 ms at
# batch 1 against 5.6 ms (13.9 against 12.6 ms at batch 8), bit-identical. The decoder's own products gain at one row
# and lose at eight (all 73: 29.2 against 23.9 ms at batch 1, 38.0 against 44.8 at batch 8), so they are left as
# loaded. `generate` moves a float32 head into that layout once (the tied embedding with it: its row lookups do not
# mind), when the copy fits in half the memory the OS reports available: a model larger than that keeps sharing
# its file's pages. Where memory allows, the head is also packed (`opt_torch.linear`: 3.5 ms), which the decode
# loops use instead.
#
# On an int8 model (`quantize("int8")`) the decoder's products are int8 and the float head becomes most of each
# step's bytes (154 of 240 MB for opt-125m), so `generate` computes the head's logits with an int8 copy of its weight
# (per-row scales, `opt_core.quantization.quantize_int8`, as CTranslate2's int8 does): 1.0 ms against 5.6 ms at
# batch 1, 3.0 against 12.6 at batch 8 (same benchmark). `forward` keeps the float head, so scores and training
# stay HF's.
DECODE_LAYOUT_DTYPES = (torch.float32,)


def prepare_decoding(model, pack: bool = True) -> None:
    """Before a CPU decode: the LM head in its decode layout (`DECODE_LAYOUT_DTYPES`, once, in place; the
    Parameter, its values and its tie stay as they are), on an int8 model the head's int8 copy, and with `pack`
    the oneDNN-packed copies of the float32 dense weights (`opt_torch.linear`) that the loops compute with."""
    if getattr(model, "is_dispatched", False):
        return
    head = model.lm_head
    weight = head.weight
    plain = type(weight) is torch.nn.Parameter and weight.device.type == "cpu" and not isinstance(head, LoraLinear)
    size = weight.numel() * weight.element_size()
    if plain and weight.dtype in DECODE_LAYOUT_DTYPES and weight.is_contiguous() and size <= _available_memory() // 2:
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
    int8_head = plain and model.is_quantized and head.in_features % PACK_MM_MULTIPLE == 0
    if int8_head:
        _int8_head(model, weight)
    else:  # e.g. the head was wrapped by a LoRA adapter since: it computes itself
        model._int8_head = None
    if pack:
        pack_linears([m for m in model.modules() if not (int8_head and m is head)], _available_memory() // 2)


def _int8_head(model, weight: torch.Tensor) -> None:
    """Keeps `model._int8_head` = (int8 weight, scales, the float weight's `weight_identity`, the float weight:
    held, as `opt_torch.linear.Linear.packed` holds its own) current."""
    held = getattr(model, "_int8_head", None)
    if held is not None and held[2] == weight_identity(weight):
        return
    q, scale = quantize_int8(torch_to_numpy(weight))
    # clone: into torch's 64-byte aligned memory, which the packed op needs (opt_torch.pretrained._SHAREABLE)
    model._int8_head = (torch.from_numpy(q).clone(), torch.from_numpy(scale), weight_identity(weight), weight.detach())


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The decode loop's float32 logits: the LM head, or on an int8 model its int8 copy (`prepare_decoding`)."""
    held = getattr(model, "_int8_head", None)  # current: prepare_decoding runs before every loop
    if held is not None:
        return int8_linear(hidden, held[0], held[1], None).float()
    return model.lm_head(hidden).float()


def _available_memory() -> int:
    """Bytes the OS can give without swapping (Linux's MemAvailable); 0 where unknown, so nothing is copied."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def _host(x):
    """Prompt ids or a mask for `prepare_generation`, which takes host arrays: a tensor (on any device) as numpy."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


# ----- the loops' shared pieces


def _prompt(model, call: GenerationCall):
    """The call's expanded prompt on the model's device: input_ids and attention_mask, B T0 int64."""
    return torch.from_numpy(call.input_ids).to(model.device), torch.from_numpy(call.attention_mask).to(model.device)


# A compiled step is compiled once per batch size and cache length; its cache gets max_length rounded up to a multiple
# of this, so calls whose prompt and new tokens add up to lengths in one bucket reuse one program (torch.compile runs
# eagerly after 8 programs of one function). The slots past max_length are never written, and the mask hides them.
COMPILED_CACHE_MULTIPLE = 64


def cache_slots(step, max_length: int) -> int:
    """Slots of the static cache the loop decodes into with `step`: max_length, or for a compiled step max_length
    rounded up to a multiple of COMPILED_CACHE_MULTIPLE."""
    if step is decode_step:
        return max_length
    return -(-max_length // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE


def _start(model, step, input_ids, attention_mask, options: DecodeOptions):
    """Buffers for a loop: sequences B L (L = max_length, pad-filled), the mask over the cache's S slots, the
    cache; and the prefill."""
    batch, prompt = input_ids.shape
    sequences = torch.full(
        (batch, options.max_length), int(options.pad_token_id), dtype=torch.long, device=input_ids.device
    )
    sequences[:, :prompt] = input_ids
    slots = cache_slots(step, options.max_length)
    mask = torch.zeros((batch, slots), dtype=torch.long, device=input_ids.device)
    mask[:, :prompt] = attention_mask
    cache = model.init_cache(batch, slots)
    logits, hidden = prefill(model, input_ids, mask, cache)
    return sequences, mask, cache, logits, hidden


def _first_real(attention_mask):
    """B T0 -> B: each row's first real (not left-padded) position."""
    return (attention_mask != 0).int().argmax(dim=1)


def _stopped(stop_strings: StopStrings, rows):
    """R T ids -> R bool on their device: the rows whose text now ends with a stop string."""
    return torch.from_numpy(stop_strings.stopped(rows.cpu().numpy())).to(rows.device)


class _Finisher:
    """Bookkeeping shared by the one-token-per-row loops: padding finished rows, eos, stop strings, streaming."""

    def __init__(self, options: DecodeOptions, input_ids, streamer, stop_strings: StopStrings | None):
        self.options, self.streamer, self.stop_strings = options, streamer, stop_strings
        self.eos = torch.from_numpy(options.eos_ids).long().to(input_ids.device)
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())

    def record(self, sequences, cur_len, tokens):
        tokens = torch.where(self.unfinished, tokens, int(self.options.pad_token_id))  # finished rows: pad, as HF
        sequences[:, cur_len] = tokens
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())
        self.unfinished &= ~torch.isin(tokens, self.eos)
        return tokens

    def done(self, sequences, cur_len) -> bool:
        if self.stop_strings is not None:
            self.unfinished &= ~_stopped(self.stop_strings, sequences[:, :cur_len])
        finished = cur_len == self.options.max_length or not self.unfinished.any()
        if finished and self.streamer is not None:
            self.streamer.end()
        return finished


# ----- sampling and greedy search


def sample_or_greedy(model, step, call: GenerationCall):
    options = call.options
    input_ids, attention_mask = _prompt(model, call)
    sequences, mask, cache, logits, _ = _start(model, step, input_ids, attention_mask, options)
    first_real = _first_real(attention_mask)
    uniforms = torch.from_numpy(call.uniforms).to(input_ids.device)  # B M
    rows = _Finisher(options, input_ids, call.streamer, call.stop_strings)
    cur_len = options.prompt_length
    while True:
        scores = process_logits(logits, sequences, cur_len, options, first_real)
        if options.do_sample:
            tokens = sample_from(warp_for_sampling(scores, options), uniforms[:, cur_len - options.prompt_length])
        else:
            tokens = scores.argmax(dim=-1)
        tokens = rows.record(sequences, cur_len, tokens)
        cur_len += 1
        if rows.done(sequences, cur_len):
            return sequences[:, :cur_len]
        mask[:, cur_len - 1] = 1
        logits, _ = step(model, tokens[:, None], mask, cache, torch.tensor([cur_len - 1], device=tokens.device))


# ----- contrastive search


def contrastive_search(model, step, call: GenerationCall):
    """Contrastive search as transformers 4.55 implements it: each step scores the top_k candidates by
    (1 - alpha) * probability - alpha * (max cosine similarity of the candidate's final hidden state to the
    context's), padded prompt positions excluded; the hidden states are taken after the final norm and project_out.
    """
    options = call.options
    input_ids, attention_mask = _prompt(model, call)
    batch, top_k = input_ids.shape[0], options.top_k
    expanded = (input_ids.repeat_interleave(top_k, dim=0), attention_mask.repeat_interleave(top_k, dim=0))
    sequences, mask, cache, logits, context = _start(model, step, *expanded, options)  # B*K rows: one per candidate
    sequences, logits, context = sequences[::top_k].clone(), logits[::top_k], context[::top_k]  # B S, B V, B T0 E
    context_mask = attention_mask.clone()  # B T0, grows by one real slot per step
    first_real = _first_real(attention_mask)
    rows = _Finisher(options, input_ids, call.streamer, call.stop_strings)
    batch_rows = torch.arange(batch, device=input_ids.device)
    cur_len = options.prompt_length
    while True:
        scores = process_logits(logits, sequences, cur_len, options, first_real)
        top_probs, top_ids = torch.topk(torch.softmax(scores, dim=-1), k=top_k)  # B K
        mask[:, cur_len] = 1
        slot = torch.tensor([cur_len], device=input_ids.device)
        all_logits, hidden = step(model, top_ids.reshape(-1, 1), mask, cache, slot)
        hidden = hidden.view(batch, top_k, -1)  # B K E
        selected = _rank_candidates(context, hidden, top_probs, context_mask, options)  # B
        rows.record(sequences, cur_len, top_ids[batch_rows, selected])
        cache.reorder((batch_rows * top_k + selected).repeat_interleave(top_k))  # every candidate row continues it
        context = torch.cat([context, hidden[batch_rows, selected][:, None]], dim=1)
        context_mask = torch.cat([context_mask, context_mask.new_ones((batch, 1))], dim=1)
        logits = all_logits.view(batch, top_k, -1)[batch_rows, selected]
        cur_len += 1
        if rows.done(sequences, cur_len):
            return sequences[:, :cur_len]


def _rank_candidates(context, candidates, probs, context_mask, options: DecodeOptions):
    """context B S E, candidates B K E, probs B K, context_mask B S -> the best candidate per row (B)."""
    context = context / context.norm(dim=-1, keepdim=True)
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    cosine = candidates @ context.transpose(1, 2)  # B K S
    cosine = cosine + ((1 - context_mask.to(cosine.dtype)) * torch.finfo(cosine.dtype).min)[:, None, :]
    penalty = cosine.max(dim=-1).values  # B K
    return (float(options.one_minus_alpha) * probs - float(options.alpha) * penalty).argmax(dim=-1)


# ----- beam search


class BeamState(NamedTuple):
    """Beam search's buffers (HF's vectorised algorithm); `mask` and `cache` are updated in place."""

    cur_len: int
    running: torch.Tensor  # B K S: the live beams
    running_scores: torch.Tensor  # B K float32: their summed log-probabilities
    running_indices: torch.Tensor  # B K M: the flat beam row each step came from (-1 before it)
    finished: torch.Tensor  # B K S: the best finished hypotheses
    finished_scores: torch.Tensor  # B K float32: their length-penalised scores
    finished_indices: torch.Tensor  # B K M
    is_finished: torch.Tensor  # B K bool: which `finished` slots hold a real hypothesis
    improvable: torch.Tensor  # B 1 bool: can the running beams still beat the finished ones
    mask: torch.Tensor  # B*K S
    cache: StaticKVCache  # B*K rows
    first_real: torch.Tensor  # B*K


class BeamCandidates(NamedTuple):
    """One step's candidates: the best beams_to_keep (call it 2K) continuations of each row."""

    scores: torch.Tensor  # B 2K float32: summed log-probabilities
    sequences: torch.Tensor  # B 2K S
    indices: torch.Tensor  # B 2K M
    hits: torch.Tensor  # B 2K bool: the candidate ends here (eos, max length, or a stop string)


def _gather_beams(tensor, indices):
    """tensor B K' ..., indices B K -> B K ... (HF's _gather_beams)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices.expand(*indices.shape[:2], *tensor.shape[2:]), dim=1)


def beam_search(model, step, call: GenerationCall):
    """HF's vectorised beam search (transformers >= 4.50): same candidates, scores, stopping and output length."""
    options = call.options
    state, logits = _beam_start(model, step, call)
    while True:
        candidates = _beam_candidates(options, state, logits, call.stop_strings)
        state, keep_going = _beam_select(options, state, candidates)
        if not keep_going:
            return _beam_result(options, state)
        logits = _beam_advance(model, step, state)


def _beam_start(model, step, call: GenerationCall):
    """The prefill of every beam row (B*K T0) and the initial state; returns it and the next-token logits."""
    options = call.options
    input_ids, attention_mask = _prompt(model, call)
    num_beams, prompt, max_length = options.num_beams, options.prompt_length, options.max_length
    batch, device = input_ids.shape[0] // num_beams, input_ids.device
    _, mask, cache, logits, _ = _start(model, step, input_ids, attention_mask, options)
    running = torch.full((batch, num_beams, max_length), int(options.beam_fill), dtype=torch.long, device=device)
    running[:, :, :prompt] = input_ids.view(batch, num_beams, prompt)
    running_scores = torch.zeros((batch, num_beams), device=device)
    running_scores[:, 1:] = -1e9
    no_indices = torch.full((batch, num_beams, max_length - prompt), -1, dtype=torch.long, device=device)
    state = BeamState(
        cur_len=prompt,
        running=running,
        running_scores=running_scores,
        running_indices=no_indices,
        finished=running.clone(),
        finished_scores=torch.full((batch, num_beams), -1e9, device=device),
        finished_indices=no_indices.clone(),
        is_finished=torch.zeros((batch, num_beams), dtype=torch.bool, device=device),
        improvable=torch.ones((batch, 1), dtype=torch.bool, device=device),
        mask=mask,
        cache=cache,
        first_real=_first_real(attention_mask),
    )
    return state, logits


def _beam_candidates(options: DecodeOptions, state: BeamState, logits, stop_strings) -> BeamCandidates:
    """HF's candidates: the top 2K of every beam's processed log-probabilities plus its score (logits B*K V)."""
    (batch, num_beams, max_length), cur_len = state.running.shape, state.cur_len
    device = logits.device
    flat = state.running.view(batch * num_beams, max_length)
    log_probs = process_logits(F.log_softmax(logits, dim=-1), flat, cur_len, options, state.first_real)
    log_probs = (log_probs.view(batch, num_beams, -1) + state.running_scores[:, :, None]).view(batch, -1)
    topk_scores, topk_flat = torch.topk(log_probs, k=options.beams_to_keep)  # B 2K
    vocab = logits.shape[-1]
    topk_beams = topk_flat // vocab
    sequences = _gather_beams(state.running, topk_beams)
    sequences[:, :, cur_len] = topk_flat % vocab
    indices = _gather_beams(state.running_indices, topk_beams)
    origins = topk_beams + torch.arange(batch, device=device)[:, None] * num_beams  # the flat row each extends
    indices[:, :, cur_len - options.prompt_length] = origins
    eos = torch.from_numpy(options.eos_ids).long().to(device)
    hits = torch.isin(sequences[:, :, cur_len], eos) | (cur_len + 1 >= max_length)
    if stop_strings is not None:
        hits |= _stopped(stop_strings, sequences[:, :, : cur_len + 1].flatten(0, 1)).view_as(hits)
    return BeamCandidates(topk_scores, sequences, indices, hits)


def _beam_select(options: DecodeOptions, state: BeamState, candidates: BeamCandidates):
    """HF's update: the running beams, the merged finished ones, the cache's reorder; and whether to go on."""
    # The running beams: the best continuations that did not just finish.
    masked_scores = candidates.scores + candidates.hits.float() * -1.0e9
    keep = torch.topk(masked_scores, k=options.num_beams).indices
    state = state._replace(
        running=_gather_beams(candidates.sequences, keep),
        running_scores=_gather_beams(masked_scores, keep),
        running_indices=_gather_beams(candidates.indices, keep),
    )
    state = _merge_finished(options, state, candidates)
    state.cache.reorder(state.running_indices[..., state.cur_len - options.prompt_length].flatten())
    cur_len = state.cur_len + 1
    improvable = _still_improvable(options, state, cur_len)
    done_all = torch.all(state.is_finished) & options.stop_when_full
    keep_going = bool(torch.any(improvable) and not done_all and not torch.all(candidates.hits))
    return state._replace(cur_len=cur_len, improvable=improvable), keep_going


def _merge_finished(options: DecodeOptions, state: BeamState, candidates: BeamCandidates) -> BeamState:
    """The finished beams: merge in candidates among the top num_beams that just finished."""
    num_beams = options.num_beams
    top_num_beam_mask = torch.arange(options.beams_to_keep, device=candidates.hits.device) < num_beams
    just_finished = candidates.hits & top_num_beam_mask[None, :]
    divisor = float(options.length_divisors[state.cur_len + 1 - options.prompt_length])  # new tokens ** penalty
    final_scores = candidates.scores / divisor
    full = torch.all(state.is_finished, dim=-1, keepdim=True) & options.stop_when_full
    final_scores = final_scores + full.float() * -1.0e9 + (~state.improvable).float() * -1.0e9
    final_scores = final_scores + (~just_finished) * -1.0e9
    merged_scores = torch.cat((state.finished_scores, final_scores), dim=1)
    best = torch.topk(merged_scores, k=num_beams).indices
    return state._replace(
        finished=_gather_beams(torch.cat((state.finished, candidates.sequences), dim=1), best),
        finished_scores=_gather_beams(merged_scores, best),
        finished_indices=_gather_beams(torch.cat((state.finished_indices, candidates.indices), dim=1), best),
        is_finished=_gather_beams(torch.cat((state.is_finished, just_finished), dim=1), best),
    )


def _still_improvable(options: DecodeOptions, state: BeamState, cur_len: int):
    """HF's early-stop heuristic: can the best running beam still beat the worst finished one?"""
    best_length = options.max_new_tokens if options.best_at_max_length else cur_len - options.prompt_length
    best_running = state.running_scores[:, :1] / float(options.length_divisors[best_length])
    worst = torch.min(state.finished_scores, dim=1, keepdim=True)[0]
    worst_finished = torch.where(state.is_finished, worst, -1.0e9)
    return state.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def _beam_advance(model, step, state: BeamState):
    """Feeds each running beam's last token through the model (mask and cache in place); returns the logits."""
    cur_len = state.cur_len
    # contiguous: a column of the B K L buffer has stride L, which would recompile a compiled step for every L
    tokens = state.running[:, :, cur_len - 1].reshape(-1).contiguous()  # B*K
    state.mask[:, cur_len - 1] = 1
    slot = torch.tensor([cur_len - 1], device=tokens.device)
    logits, _ = step(model, tokens[:, None], state.mask, state.cache, slot)
    return logits


def _beam_result(options: DecodeOptions, state: BeamState):
    """The best num_return_sequences hypotheses of each row, (B*R) (T0 + new), as long as HF returns them."""
    batch, _, max_length = state.finished.shape
    returned = options.num_return_sequences
    sequences = state.finished[:, :returned].reshape(batch * returned, max_length)
    indices = state.finished_indices[:, :returned].reshape(batch * returned, -1)
    generated = int((indices + 1).bool().sum(dim=1).max())
    return sequences[:, : options.prompt_length + generated]


LOOPS = {"sample": sample_or_greedy, "contrastive": contrastive_search, "beam": beam_search}
