"""Decoding for the PyTorch models: prefill, one decode step (the unit `torch.compile` compiles), the loops.

Siblings: `opt_tf/generation.py`, `opt_flax/generation.py`; the framework-free parts (GenerationConfig, lengths,
seeded draws, streamers) live in `opt_core/generation.py`. The loops reproduce HF transformers' `generate`: the
same logits processors in the same order, the same stopping and padding rules, and its vectorised beam search.

Shapes: B batch, K beams, T0 prompt length, S max length (static cache size), V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt_core.generation import DecodingPlan, GenerationConfig, decoding_strategy, hits_stop_string, plan_decoding
from opt_core.inputs import validate_inputs

# ----- the model calls: prefill and one decode step


def prefill(model, input_ids, attention_mask, cache):
    """Runs the prompt (B T0) into the static cache; returns the last position's logits (B V) and the final
    hidden states of every prompt position (B T0 E, after the final norm and project_out)."""
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    hidden = model.model.decoder(
        input_ids, attention_mask, past_key_values=cache, use_cache=True, cache_position=slots
    ).last_hidden_state
    return model.lm_head(hidden[:, -1]).float(), hidden


def decode_step(model, tokens, attention_mask, cache, slot):
    """One token per row (B 1) written at `slot` (a 1-element tensor); returns logits B V and last hidden B E.

    Every call has the same shapes, so `torch.compile` compiles it once per (B, S).
    """
    hidden = model.model.decoder(
        tokens, attention_mask, past_key_values=cache, use_cache=True, cache_position=slot, validate=False
    ).last_hidden_state[:, -1]
    return model.lm_head(hidden).float(), hidden


# ----- logits processors (HF's order: repetition penalty, no-repeat n-grams, min length; then the warpers)


def process_logits(scores, sequences, cur_len, plan: DecodingPlan, config: GenerationConfig, first_real):
    """B V scores for the next token of `sequences[:, :cur_len]`, with every processor the config asks for."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, sequences[:, :cur_len], first_real, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, sequences[:, :cur_len], config.no_repeat_ngram_size)
    if cur_len < plan.min_length and plan.eos_ids:
        scores = scores.clone()
        scores[:, list(plan.eos_ids)] = -float("inf")
    return scores


def warp_for_sampling(scores, config: GenerationConfig, min_tokens_to_keep: int = 1):
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k:
        top_k = min(max(config.top_k, min_tokens_to_keep), scores.shape[-1])
        threshold = torch.topk(scores, top_k).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - config.top_p)
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


# ----- the loops


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
            streamer: receives the prompt, then each new token (batch of one): `put(ids)`, then `end()`.
            seed: seeds the sampling draws (reproducible, and identical across the three frameworks).
            tokenizer: needed for `stop_strings`.
            compile: run the decode step through `torch.compile` (one compilation per batch size and length).
            **kwargs: GenerationConfig fields, e.g. max_new_tokens=50, do_sample=True, top_p=0.9.
        """
        base = generation_config or self.generation_config or GenerationConfig.from_model_config(self.config)
        config = base.updated(**kwargs)
        input_ids, attention_mask = self._prepare_prompt(input_ids, attention_mask)
        if config.max_new_tokens == 0 or (config.max_new_tokens is None and config.max_length <= input_ids.shape[1]):
            return input_ids.repeat_interleave(config.num_return_sequences, dim=0)  # nothing to generate
        expand = config.num_beams if config.num_beams > 1 else config.num_return_sequences
        if expand > 1:
            input_ids = input_ids.repeat_interleave(expand, dim=0)
            attention_mask = attention_mask.repeat_interleave(expand, dim=0)
        plan = plan_decoding(config, input_ids.shape[0], input_ids.shape[1], self.config.max_position_embeddings, seed)
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: generate(..., tokenizer=tokenizer)")
        step = self._step_function(compile)
        strategy = decoding_strategy(config)
        if strategy == "beam":
            return beam_search(self, step, input_ids, attention_mask, plan, config, tokenizer)
        if strategy == "contrastive":
            return contrastive_search(self, step, input_ids, attention_mask, plan, config, streamer, tokenizer)
        return sample_or_greedy(self, step, input_ids, attention_mask, plan, config, streamer, tokenizer)

    def _prepare_prompt(self, input_ids, attention_mask):
        if input_ids is None:
            input_ids = torch.full((1, 1), self.config.bos_token_id, dtype=torch.long)
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask, device=self.device).long()
        validate_inputs(self.config, input_ids.cpu().numpy(), attention_mask.cpu().numpy(), None, 0, input_ids.shape)
        return input_ids.long(), attention_mask

    def _step_function(self, compile: bool):
        if not compile:
            return decode_step
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(decode_step, dynamic=False, fullgraph=True)
        return self._compiled_step


def _start(model, input_ids, attention_mask, plan):
    """Buffers for a loop: sequences B S (pad-filled), the mask over S slots, the cache; and the prefill."""
    from opt_torch.modeling import StaticKVCache  # modeling imports this module for GenerationMixin

    batch, prompt = input_ids.shape
    sequences = torch.full((batch, plan.max_length), plan.pad_token_id, dtype=torch.long, device=input_ids.device)
    sequences[:, :prompt] = input_ids
    mask = torch.zeros((batch, plan.max_length), dtype=torch.long, device=input_ids.device)
    mask[:, :prompt] = attention_mask
    cache = StaticKVCache(model.config, batch, plan.max_length, model.dtype, input_ids.device)
    logits, hidden = prefill(model, input_ids, mask, cache)
    return sequences, mask, cache, logits, hidden


def sample_or_greedy(model, step, input_ids, attention_mask, plan, config, streamer, tokenizer):
    sequences, mask, cache, logits, _ = _start(model, input_ids, attention_mask, plan)
    first_real = (attention_mask != 0).int().argmax(dim=1)
    uniforms = torch.from_numpy(plan.uniforms).to(input_ids.device) if plan.uniforms is not None else None
    stream = _Finisher(plan, input_ids, streamer, config, tokenizer)
    cur_len = plan.prompt_length
    while True:
        scores = process_logits(logits, sequences, cur_len, plan, config, first_real)
        if config.do_sample:
            tokens = sample_from(warp_for_sampling(scores, config), uniforms[:, cur_len - plan.prompt_length])
        else:
            tokens = scores.argmax(dim=-1)
        tokens = stream.record(sequences, cur_len, tokens)
        cur_len += 1
        if stream.done(sequences, cur_len):
            return sequences[:, :cur_len]
        mask[:, cur_len - 1] = 1
        logits, _ = step(model, tokens[:, None], mask, cache, torch.tensor([cur_len - 1], device=tokens.device))


class _Finisher:
    """Bookkeeping shared by the one-token-per-row loops: padding finished rows, eos, stop strings, streaming."""

    def __init__(self, plan, input_ids, streamer, config, tokenizer):
        self.plan, self.streamer, self.config, self.tokenizer = plan, streamer, config, tokenizer
        self.eos = torch.tensor(plan.eos_ids, dtype=torch.long, device=input_ids.device)
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if streamer is not None:
            streamer.put(input_ids.cpu())

    def record(self, sequences, cur_len, tokens):
        tokens = torch.where(self.unfinished, tokens, self.plan.pad_token_id)  # finished rows are padded, as HF
        sequences[:, cur_len] = tokens
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())
        self.unfinished &= ~torch.isin(tokens, self.eos)
        return tokens

    def done(self, sequences, cur_len) -> bool:
        if self.config.stop_strings:
            self.unfinished &= _not_stopped(sequences[:, :cur_len], self.config.stop_strings, self.tokenizer)
        finished = cur_len == self.plan.max_length or not self.unfinished.any()
        if finished and self.streamer is not None:
            self.streamer.end()
        return finished


def contrastive_search(model, step, input_ids, attention_mask, plan, config, streamer, tokenizer):
    """Contrastive search as transformers 4.55 implements it: each step scores the top_k candidates by
    (1 - alpha) * probability - alpha * (max cosine similarity of the candidate's final hidden state to the
    context's), padded prompt positions excluded; the hidden states are taken after the final norm and project_out.
    """
    batch, top_k, alpha = input_ids.shape[0], config.top_k, config.penalty_alpha
    expanded_ids = input_ids.repeat_interleave(top_k, dim=0)  # B*K rows: one per candidate
    sequences, mask, cache, logits, context = _start(
        model, expanded_ids, attention_mask.repeat_interleave(top_k, 0), plan
    )
    sequences, logits, context = sequences[::top_k].clone(), logits[::top_k], context[::top_k]  # B S, B V, B T0 E
    context_mask = attention_mask.clone()  # B T0, grows by one real slot per step
    first_real = (attention_mask != 0).int().argmax(dim=1)
    stream = _Finisher(plan, input_ids, streamer, config, tokenizer)
    rows = torch.arange(batch, device=input_ids.device)
    cur_len = plan.prompt_length
    while True:
        scores = process_logits(logits, sequences, cur_len, plan, config, first_real)
        top_probs, top_ids = torch.topk(torch.softmax(scores, dim=-1), k=top_k)  # B K
        mask[:, cur_len] = 1
        all_logits, hidden = step(
            model, top_ids.reshape(-1, 1), mask, cache, torch.tensor([cur_len], device=rows.device)
        )
        selected = _rank_candidates(context, hidden.view(batch, top_k, -1), top_probs, context_mask, alpha)  # B
        stream.record(sequences, cur_len, top_ids[rows, selected])
        cache.reorder((rows * top_k + selected).repeat_interleave(top_k))  # every candidate row continues the pick
        context = torch.cat([context, hidden.view(batch, top_k, -1)[rows, selected][:, None]], dim=1)
        context_mask = torch.cat([context_mask, context_mask.new_ones((batch, 1))], dim=1)
        logits = all_logits.view(batch, top_k, -1)[rows, selected]
        cur_len += 1
        if stream.done(sequences, cur_len):
            return sequences[:, :cur_len]


def _rank_candidates(context, candidates, probs, context_mask, alpha):
    """context B S E, candidates B K E, probs B K, context_mask B S -> the best candidate per row (B)."""
    context = context / context.norm(dim=-1, keepdim=True)
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    cosine = candidates @ context.transpose(1, 2)  # B K S
    cosine = cosine + ((1 - context_mask.to(cosine.dtype)) * torch.finfo(cosine.dtype).min)[:, None, :]
    penalty = cosine.max(dim=-1).values  # B K
    return ((1.0 - alpha) * probs - alpha * penalty).argmax(dim=-1)


def _not_stopped(sequences, stop_strings, tokenizer):
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    rows = sequences.cpu().tolist()
    return torch.tensor([not hits_stop_string(tokenizer, row, stops) for row in rows], device=sequences.device)


def _gather_beams(tensor, indices):
    """tensor B K' ..., indices B K -> B K ... (HF's _gather_beams)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices.expand(*indices.shape[:2], *tensor.shape[2:]), dim=1)


def beam_search(model, step, input_ids, attention_mask, plan, config, tokenizer):
    """HF's vectorised beam search (transformers >= 4.50): same candidates, scores, stopping and output length."""
    num_beams = config.num_beams
    batch = input_ids.shape[0] // num_beams
    prompt, max_length = plan.prompt_length, plan.max_length
    flat_sequences, mask, cache, logits, _ = _start(model, input_ids, attention_mask, plan)
    device = input_ids.device
    eos = torch.tensor(plan.eos_ids, dtype=torch.long, device=device)
    beams_to_keep = max(2, 1 + len(plan.eos_ids)) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
    fill = config.pad_token_id or plan.eos_ids[0] if plan.eos_ids else -1  # HF's precedence, kept as is
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt] = input_ids.view(batch, num_beams, prompt)
    finished = running.clone()
    running_scores = torch.zeros((batch, num_beams), device=device)
    running_scores[:, 1:] = -1e9
    finished_scores = torch.full((batch, num_beams), -1e9, device=device)
    is_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_indices = torch.full((batch, num_beams, max_length - prompt), -1, dtype=torch.long, device=device)
    finished_indices = running_indices.clone()
    first_real = (attention_mask != 0).int().argmax(dim=1)
    cur_len = prompt
    while True:
        flat = running.view(batch * num_beams, max_length)
        log_probs = process_logits(F.log_softmax(logits, dim=-1), flat, cur_len, plan, config, first_real)
        log_probs = (log_probs.view(batch, num_beams, -1) + running_scores[:, :, None]).view(batch, -1)
        topk_scores, topk_flat = torch.topk(log_probs, k=beams_to_keep)
        vocab = logits.shape[-1]
        topk_beams = topk_flat // vocab
        topk_sequences = _gather_beams(running, topk_beams)
        topk_sequences[:, :, cur_len] = topk_flat % vocab
        topk_indices = _gather_beams(running_indices, topk_beams)
        topk_indices[:, :, cur_len - prompt] = topk_beams + torch.arange(batch, device=device)[:, None] * num_beams
        hits = torch.isin(topk_sequences[:, :, cur_len], eos) | (cur_len + 1 >= max_length)
        if config.stop_strings:
            hits |= ~_not_stopped(
                topk_sequences[:, :, : cur_len + 1].flatten(0, 1), config.stop_strings, tokenizer
            ).view_as(hits)
        # The running beams: the best continuations that did not just finish.
        masked_scores = topk_scores + hits.float() * -1.0e9
        keep = torch.topk(masked_scores, k=num_beams).indices
        running, running_scores = _gather_beams(topk_sequences, keep), _gather_beams(masked_scores, keep)
        running_indices = _gather_beams(topk_indices, keep)
        # The finished beams: merge in candidates among the top num_beams that just finished.
        just_finished = hits & top_num_beam_mask[None, :]
        final_scores = topk_scores / ((cur_len + 1 - prompt) ** config.length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (config.early_stopping is True)
        final_scores = final_scores + full.float() * -1.0e9 + (~improvable).float() * -1.0e9
        final_scores = final_scores + (~just_finished) * -1.0e9
        merged_scores = torch.cat((finished_scores, final_scores), dim=1)
        best = torch.topk(merged_scores, k=num_beams).indices
        finished = _gather_beams(torch.cat((finished, topk_sequences), dim=1), best)
        finished_scores = _gather_beams(merged_scores, best)
        finished_indices = _gather_beams(torch.cat((finished_indices, topk_indices), dim=1), best)
        is_finished = _gather_beams(torch.cat((is_finished, just_finished), dim=1), best)
        cache.reorder(running_indices[..., cur_len - prompt].flatten())
        cur_len += 1
        improvable = _still_improvable(improvable, running_scores, finished_scores, is_finished, cur_len, plan, config)
        done_all = torch.all(is_finished) & (config.early_stopping is True)
        if not (torch.any(improvable) and not done_all and not torch.all(hits)):
            break
        tokens = running[:, :, cur_len - 1].reshape(-1)
        mask[:, cur_len - 1] = 1
        logits, _ = step(model, tokens[:, None], mask, cache, torch.tensor([cur_len - 1], device=device))
    returned = config.num_return_sequences
    sequences = finished[:, :returned].reshape(batch * returned, max_length)
    indices = finished_indices[:, :returned].reshape(batch * returned, -1)
    generated = int((indices + 1).bool().sum(dim=1).max())
    return sequences[:, : prompt + generated]


def _still_improvable(improvable, running_scores, finished_scores, is_finished, cur_len, plan, config):
    """HF's early-stop heuristic: can the best running beam still beat the worst finished one?"""
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        best_length = plan.max_length - plan.prompt_length
    else:
        best_length = cur_len - plan.prompt_length
    best_running = running_scores[:, :1] / (best_length**config.length_penalty)
    worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
    return improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
