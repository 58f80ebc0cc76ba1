"""OPT in PyTorch: attention, decoder layer, decoder, `OPTModel` and the three heads, top to bottom.

Siblings: `opt_tf/modeling.py` (Keras 3) and `opt_flax/modeling.py` (Flax) have the same classes, attributes,
argument order and comments; a diff between them shows framework idioms only. Attribute names equal HF's
checkpoint names, so `state_dict()` keys are the canonical names of `opt_core.weights`.

Shapes: B batch, T query length, S key/cache length, N heads, H head dim, D hidden, E word-embedding dim,
F ffn dim, V vocab, L layers, C labels.

Caches: `past_key_values` is HF's layout, per layer (k, v) each B N S H; a forward with `use_cache=True` returns
the grown tuple. `StaticKVCache` (in `opt_torch.cache`) preallocates the same layout for compiled decoding. Either
way attention receives its layer's view of the cache and calls its `update` (HF's `Cache.update`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opt_core.config import OPTConfig
from opt_core.errors import InputError
from opt_core.heads import pools_last_position, problem_type
from opt_core.inputs import check_ids_or_embeds, validate_inputs
from opt_core.masks import MASKED_SCORE
from opt_core.outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
)
from opt_torch.cache import DynamicKVCache, StaticKVCache, StaticLayerCache
from opt_torch.generation import GenerationMixin
from opt_torch.linear import Linear
from opt_torch.pretrained import PreTrainedOPT

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def make_position_ids(attention_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    # OPT quirk: positions count real tokens only, `cumsum(mask) * mask - 1` over the full (past + current) mask,
    # so left padding does not shift them; padded slots get -1. B S -> B T
    positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1
    return positions[:, query_slots].long()


def make_attention_mask(attention_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """B S padding mask -> B 1 T S boolean mask, True where query t may attend key s (causal and not padded)."""
    key_slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # T S
    return causal[None, None] & attention_mask[:, None, None, :].bool()


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """B N T S scores and B 1 T S mask -> attention probs in the scores' dtype, 0 where the mask is False."""
    # Masks are applied once, through a select, never added (opt_core.masks: HF's fp16 NaN, issue #17433); the
    # softmax runs in fp32, and the select after the upcast, so the fill is below every half-precision score.
    probs = torch.softmax(torch.where(mask, scores.float(), MASKED_SCORE), dim=-1).to(scores.dtype)
    # A query with nothing to attend to (a padded slot) gets zero attention, as torch's SDPA gives and so
    # HF's default; this matters for the loss, where a pad slot's logits predict the first real token.
    return torch.where(mask, probs, 0.0)


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """OPT's position table: max_position_embeddings + 2 rows, looked up at position + 2."""

    # OPT quirk: metaseq reserved rows 0 and 1, so positions are looked up at `+ 2`.
    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int):
        super().__init__(num_positions + self.offset, embedding_dim)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(position_ids + self.offset)  # B T -> B T D


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        d, bias = config.hidden_size, config.enable_bias
        self.k_proj = Linear(d, d, bias=bias)
        self.v_proj = Linear(d, d, bias=bias)
        self.q_proj = Linear(d, d, bias=bias)
        self.out_proj = Linear(d, d, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1: N heads, or this rank's N / tp under tensor parallelism (opt_torch.distributed splits whole heads).
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)  # B T D -> B N T H

    def forward(self, hidden_states, mask, past_key_value=None, output_attentions=False):
        # OPT quirk: the projected query (bias included) is scaled by head_dim ** -0.5 before q @ k; the
        # attention below then runs with scale 1. Never scale twice.
        q = self._split_heads(self.q_proj(hidden_states) * self.scaling)  # B N T H
        k = self._split_heads(self.k_proj(hidden_states))  # B N T H
        v = self._split_heads(self.v_proj(hidden_states))  # B N T H
        if past_key_value is not None:  # this layer's cache (opt_torch.cache): stores k, v, returns all so far
            k, v = past_key_value.update(k, v)  # B N S H
        dropout = self.dropout if self.training else 0.0
        probs = None
        if self.attn_implementation == "sdpa" and not output_attentions:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
        else:
            scores = q @ k.transpose(-1, -2)  # B N T S
            probs = masked_softmax(scores, mask)  # B N T S
            attn = F.dropout(probs, p=dropout, training=self.training) @ v  # B N T H
        b, _, t, _ = attn.shape
        attn = attn.transpose(1, 2).reshape(b, t, -1)  # B N T H -> B T D
        return self.out_proj(attn), probs


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation_fn = ACTIVATIONS[config.activation_function]
        affine = config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)

    def forward(self, hidden_states, mask, past_key_value=None, output_attentions=False):
        # OPT quirk: opt-350m (do_layer_norm_before=False) is post-LN; every other size is pre-LN.
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, probs = self.self_attn(hidden_states, mask, past_key_value, output_attentions)
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))  # B T D -> B T F -> B T D
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, probs


def compiled_layer(layer: OPTDecoderLayer, hidden_states, mask, past: StaticLayerCache) -> torch.Tensor:
    """A decoder layer over its static cache inside `torch.compile` (the compiled decode step): one nested compile
    region, so dynamo traces and Inductor compiles one layer and stamps it out L times, instead of tracing and
    compiling every layer (opt-125m's cold first `generate(compile=True)`: see BENCHMARKS.md)."""
    return _layer_region(layer, hidden_states, mask, past.keys, past.values, past.cache_position)


# A region is reused where its inputs match in structure, shapes and dtypes; layers that differ (LoRA on some layers
# only, ranks per layer) get one traced region each, up to one per layer.
@torch.compiler.nested_compile_region(max_reuse_entries=1024)
def _layer_region(layer, hidden_states, mask, keys, values, cache_position):
    hidden_states, _ = layer(hidden_states, mask, StaticLayerCache(keys, values, cache_position))
    return hidden_states


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        # OPT quirk: HF's embed_tokens is an nn.Embedding(padding_idx=pad_token_id): its lookups of the pad token
        # pass no gradient to the pad row; a tied LM head's own gradient on that row still flows, as in HF.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, padding_idx=config.pad_token_id)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        # OPT quirk: opt-350m embeds tokens in E = word_embed_proj_dim != D; project_in maps E -> D before the
        # positions are added, project_out maps D -> E after the final norm.
        if config.has_projection:
            self.project_out = Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
            self.project_in = Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
        else:
            self.project_out = self.project_in = None
        if config.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(
                config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine
            )
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=False,
        output_attentions=False,
        output_hidden_states=False,
        cache_position=None,
        validate=True,
        layer_regions=False,
    ) -> BaseModelOutputWithPast:
        input_ids, (batch, length) = _new_tokens(input_ids, inputs_embeds)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        cache = _cache(past_key_values, use_cache, cache_position, attention_mask)
        past_length = cache.past_length if isinstance(cache, DynamicKVCache) else 0
        if validate and not torch.compiler.is_compiling():  # the decode loop feeds only ids the model produced
            _validate(self.config, input_ids, attention_mask, position_ids, cache, cache_position, (batch, length))
        if cache_position is None:
            cache_position = torch.arange(past_length, past_length + length, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, device=device)
        attention_mask = attention_mask.to(device, torch.long)
        if position_ids is None:
            position_ids = make_position_ids(attention_mask, cache_position)
        mask = make_attention_mask(attention_mask, cache_position)  # B 1 T S

        hidden_states = self._embed(input_ids, inputs_embeds, position_ids)
        # layer_regions: generate's compiled step (opt_torch.generation.decode_step) runs the layers as regions.
        hidden_states, all_hidden, all_attn = self._run_layers(
            hidden_states, mask, cache, cache_position, output_attentions, layer_regions
        )
        hidden_states = self._finish(hidden_states)
        # As HF: L + 1 entries, each layer's input, then the final (normed, projected) state.
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=_returned_cache(cache) if use_cache else None,
            hidden_states=(*all_hidden, hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )

    def _embed(self, input_ids, inputs_embeds, position_ids) -> torch.Tensor:
        """The new tokens' embeddings (projected to D) plus their positions' (B T D)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # B T E
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)  # B T E -> B T D
        hidden_states = inputs_embeds + self.embed_positions(position_ids).to(inputs_embeds.dtype)
        return F.dropout(hidden_states, p=self.dropout, training=self.training)

    def _run_layers(self, hidden_states, mask, cache, cache_position, output_attentions, layer_regions=False):
        """The L layers: the last one's output, each layer's input, each layer's attention probs (or None). With
        `layer_regions`, under torch.compile, over a static cache, each layer is one nested compile region."""
        regions = layer_regions and not output_attentions and torch.compiler.is_compiling()
        all_hidden, all_attn = [], []
        for i, layer in enumerate(self.layers):
            all_hidden.append(hidden_states)
            past = cache.layer(i, cache_position) if cache is not None else None
            if regions and isinstance(past, StaticLayerCache):
                hidden_states, probs = compiled_layer(layer, hidden_states, mask, past), None
            else:
                hidden_states, probs = layer(hidden_states, mask, past, output_attentions)
            all_attn.append(probs)
        return hidden_states, all_hidden, all_attn

    def _finish(self, hidden_states) -> torch.Tensor:
        """The final norm, then project_out (B T D -> B T E)."""
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)  # B T D -> B T E
        return hidden_states


def _new_tokens(input_ids, inputs_embeds):
    """input_ids as B T (a lone row of T ids is a batch of one, as HF) and (B, T) of the new tokens."""
    check_ids_or_embeds(input_ids, inputs_embeds)
    if input_ids is not None and input_ids.dim() == 1:
        input_ids = input_ids[None]  # T -> 1 T, as HF does
    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    return input_ids, (batch, length)


def _cache(past_key_values, use_cache, cache_position, attention_mask):
    """The cache a forward updates: a StaticKVCache as given, HF's tuples in a DynamicKVCache, or None."""
    if isinstance(past_key_values, StaticKVCache):
        if cache_position is None or attention_mask is None:
            raise InputError("a StaticKVCache needs cache_position and an attention_mask over all its slots")
        return past_key_values
    if past_key_values or use_cache:
        return DynamicKVCache(past_key_values)
    return None


def _returned_cache(cache):
    """What a forward returns as past_key_values: the StaticKVCache itself, or HF's tuples."""
    return cache if isinstance(cache, StaticKVCache) else cache.to_legacy()


def _validate(config, input_ids, attention_mask, position_ids, cache, cache_position, batch_and_length):
    """Clear errors for bad input (`opt_core.inputs`) from host copies; a static cache checks the tokens fit."""

    def host(x):
        return None if x is None else x.detach().cpu().numpy()

    static = isinstance(cache, StaticKVCache)
    if static:  # its mask covers every slot, so the cache checks the mask's shape
        cache.check(cache_position, batch_and_length, tuple(attention_mask.shape))
    validate_inputs(
        config,
        host(input_ids),
        None if static else host(attention_mask),
        host(position_ids),
        cache.past_length if isinstance(cache, DynamicKVCache) else 0,
        batch_and_length,
    )


class OPTModel(PreTrainedOPT):
    """The bare OPT decoder: last hidden states (B T E), HF's `OPTModel`.

    Args:
        config: the model's OPTConfig.
    """

    head = "base"

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.decoder = OPTDecoder(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ):
        out = self.decoder(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            self.config.use_cache if use_cache is None else use_cache,
            bool(output_attentions),
            bool(output_hidden_states),
            cache_position,
        )
        return out if return_dict is not False else out.to_tuple()


class OPTForCausalLM(PreTrainedOPT, GenerationMixin):
    """OPT with its language-model head (tied to `embed_tokens` unless the config unties it).

    Args:
        config: the model's OPTConfig.
    """

    head = "causal_lm"

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.model = OPTModel(config)
        # OPT quirk: the LM head works in E = word_embed_proj_dim space and is tied to embed_tokens.
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep: int = 0,
        cache_position=None,
    ):
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache,
            output_attentions,
            output_hidden_states,
            cache_position=cache_position,
        )
        hidden_states = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        logits = self.lm_head(hidden_states)  # B T E -> B T V
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss: token t predicts label t + 1; label -100 is ignored; mean over counted tokens."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # B (T-1) V -> B(T-1) V
    shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def last_non_pad_index(input_ids, pad_token_id, batch_size):
    """HF's rule (`opt_core.heads.pools_last_position`): the rightmost token that is not pad_token_id."""
    if pools_last_position(pad_token_id, batch_size, input_ids is not None):
        return -1
    non_pad = (input_ids != pad_token_id).int()
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


class OPTForSequenceClassification(PreTrainedOPT):
    """OPT with a linear classifier read at each row's last non-pad token.

    Args:
        config: the model's OPTConfig; `num_labels` / `id2label` set the classes, `problem_type` the loss.
    """

    head = "sequence_classification"

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = OPTModel(config)
        self.score = Linear(config.word_embed_proj_dim, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ):
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache,
            output_attentions,
            output_hidden_states,
            cache_position=cache_position,
        )
        logits = self.score(out.last_hidden_state)  # B T E -> B T C
        batch = logits.shape[0]
        last = last_non_pad_index(input_ids, self.config.pad_token_id, batch)
        pooled = logits[torch.arange(batch, device=logits.device), last]  # B C
        loss = self._loss(pooled, labels) if labels is not None else None
        result = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = problem_type(self.config, self.num_labels, labels.dtype in (torch.long, torch.int))
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
            return F.mse_loss(pooled, labels.to(pooled.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))


class OPTForQuestionAnswering(PreTrainedOPT):
    """OPT with a span-extraction head: start and end logits per token.

    Args:
        config: the model's OPTConfig.
    """

    head = "question_answering"

    def __init__(self, config: OPTConfig):
        super().__init__(config)
        self.model = OPTModel(config)
        self.qa_outputs = Linear(config.word_embed_proj_dim, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ):
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache,
            output_attentions,
            output_hidden_states,
            cache_position=cache_position,
        )
        logits = self.qa_outputs(out.last_hidden_state)  # B T E -> B T 2
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        result = QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """HF's QA loss: positions outside the sequence are clamped to T and ignored; mean of start and end."""
    ignored = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
    end = end_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
    return (
        F.cross_entropy(start_logits, start, ignore_index=ignored)
        + F.cross_entropy(end_logits, end, ignore_index=ignored)
    ) / 2
