"""OPT in Flax: attention, decoder layer, decoder, `FlaxOPTModel` and the three heads, top to bottom.

Siblings: `opt_torch/modeling.py` (PyTorch) and `opt_tf/modeling.py` (Keras 3) have the same classes, attributes,
argument order and comments; a diff between them shows framework idioms only. Attribute names equal HF's
checkpoint names, so the params pytree is HF's Flax layout (`model/decoder/layers/0/self_attn/q_proj/kernel`).

Linen, not NNX: a Linen module is stateless and its params are a plain nested dict, which is exactly HF's Flax
`params` layout (HF's own Flax OPT was Linen), so loading is a rename and `model(..., params=params)` is a pure
function that `jax.jit` compiles once per input shape. Each public class (`FlaxOPTForCausalLM`, ...) wraps its
Linen module (`FlaxOPTForCausalLMModule`, ...) as HF's `FlaxPreTrainedModel` does; see `opt_flax.pretrained`.

Shapes: B batch, T query length, S key/cache length, N heads, H head dim, D hidden, E word-embedding dim,
F ffn dim, V vocab, L layers, C labels.

Caches: `KVCache` (`opt_flax.cache`) preallocates per layer (k, v), each B S N H, plus the write index, so a
compiled decode step sees static shapes. As in HF Flax: `past_key_values = model.init_cache(B, S)`, then every
call passes `attention_mask` of shape B S (the padding mask over the whole cache; slots after the current tokens
are ignored) and gets the updated cache back in `out.past_key_values`; `position_ids` default to OPT's rule over
that mask.

Bad input: concrete inputs are checked (`opt_core.inputs.validate_inputs`) before any compute, because JAX clamps
or fills out-of-range indices silently. Inside a caller's own `jax.jit` the values are tracers: shapes are still
checked at trace time, values cannot be: an out-of-range token id or position there gives NaN embeddings (JAX's
gather fills), and decoding past the cache's end overwrites its last slots (`dynamic_update_slice` clamps).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opt_core.config import OPTConfig
from opt_core.heads import pools_last_position
from opt_core.inputs import check_ids_or_embeds, check_shapes, validate_inputs
from opt_core.masks import MASKED_SCORE
from opt_core.outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
)
from opt_flax.cache import KVCache  # noqa: F401  (re-exported: `opt_flax.modeling.KVCache` was its home)
from opt_flax.generation import GenerationMixin
from opt_flax.lora import LORA_SCALING, lora_branch
from opt_flax.pretrained import FlaxPreTrainedOPT

# The shared output classes become pytrees, so a jitted `__call__` can return them.
for _output in (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    QuestionAnsweringModelOutput,
):
    with contextlib.suppress(ValueError):  # already registered: this module was imported again
        jax.tree_util.register_dataclass(_output, [f.name for f in dataclasses.fields(_output)], [])

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def make_position_ids(attention_mask: jax.Array, query_slots: jax.Array) -> jax.Array:
    # OPT quirk: positions count real tokens only, `cumsum(mask) * mask - 1` over the full (past + current) mask,
    # so left padding does not shift them; padded slots get -1. B S -> B T
    positions = jnp.cumsum(attention_mask, axis=1) * attention_mask - 1
    return positions[:, query_slots]


def make_attention_mask(attention_mask: jax.Array, query_slots: jax.Array) -> jax.Array:
    """B S padding mask -> B 1 T S boolean mask, True where query t may attend key s (causal and not padded)."""
    key_slots = jnp.arange(attention_mask.shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]  # T S
    return causal[None, None] & attention_mask[:, None, None, :].astype(bool)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """B N T S scores and B 1 T S mask -> attention probs in the scores' dtype, 0 where the mask is False."""
    # Masks are applied once, through a select, never added (opt_core.masks: HF's fp16 NaN, issue #17433); the
    # softmax runs in fp32, and the select after the upcast, so the fill is below every half-precision score.
    probs = jax.nn.softmax(jnp.where(mask, scores.astype(jnp.float32), MASKED_SCORE), axis=-1).astype(scores.dtype)
    # A query with nothing to attend to (a padded slot) gets zero attention, as torch's SDPA gives and so
    # HF's default; this matters for the loss, where a pad slot's logits predict the first real token.
    return jnp.where(mask, probs, 0.0)


class OPTDense(nn.Dense):
    """`nn.Dense` (same params: `kernel` [in, out], `bias`) that also accepts a decode-time view of its kernel.

    If the params hold `kernel_t` ([out, in], torch's layout) instead of `kernel`, the product contracts the last
    dimension of both operands. Measured on the 2-core AVX-512 CPU this project benchmarks on: XLA CPU's
    matrix-vector products read an [out, in] matrix faster (a jitted chain of one opt-125m step's GEMVs: 20.2 ms
    instead of 23.4 ms), so `generate` decodes with that view (`opt_flax.decode_layout.decode_params`, built once
    per params).

    If the params also hold an active LoRA adapter's leaves (`opt_flax.lora`: `lora_A`, `lora_B`, `lora_scaling`),
    the layer adds PEFT's branch `scaling * B(A(dropout(x)))`; its dropout runs when the call has a "dropout" rng,
    which the models pass only when training. Without those leaves it is `nn.Dense` exactly.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.has_variable("params", LORA_SCALING):
            rng = self.make_rng("dropout") if self.has_rng("dropout") else None
            branch = lora_branch(inputs, self.variables["params"], self.dtype, self.precision, rng)
            return super().__call__(inputs) + branch
        if not self.has_variable("params", "kernel_t"):
            return super().__call__(inputs)
        kernel = self.get_variable("params", "kernel_t")  # out in
        bias = self.get_variable("params", "bias") if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (1,)), ((), ())), precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class _OPTLinen(nn.Module):
    """Fields and layer factories shared by the Linen modules: HF's init, compute `dtype`, `param_dtype`."""

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dense(self, features: int, use_bias: bool = True) -> nn.Dense:
        init = nn.initializers.normal(self.config.init_std)
        return OPTDense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init)

    def layer_norm(self) -> nn.LayerNorm:
        affine = self.config.layer_norm_elementwise_affine
        # torch's LayerNorm: eps 1e-5 and the two-pass variance (flax defaults to 1e-6 and E[x^2] - E[x]^2).
        return nn.LayerNorm(
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=affine,
            use_scale=affine,
            use_fast_variance=False,
        )

    def child(self, module_class: type[nn.Module]) -> nn.Module:
        return module_class(self.config, self.dtype, self.param_dtype)


class OPTLearnedPositionalEmbedding(nn.Embed):
    """OPT's position table: max_position_embeddings + 2 rows, looked up at position + 2."""

    # OPT quirk: metaseq reserved rows 0 and 1, so positions are looked up at `+ 2`.
    offset = 2

    def __call__(self, position_ids: jax.Array) -> jax.Array:
        return super().__call__(position_ids + self.offset)  # B T -> B T D


class OPTAttention(_OPTLinen):
    def setup(self):
        config = self.config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = nn.Dropout(config.attention_dropout)
        d, bias = config.hidden_size, config.enable_bias
        self.k_proj = self.dense(d, bias)
        self.v_proj = self.dense(d, bias)
        self.q_proj = self.dense(d, bias)
        self.out_proj = self.dense(d, bias)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim)  # B T D -> B T N H

    def __call__(self, hidden_states, mask, past_key_value=None, output_attentions=False, deterministic=True):
        # OPT quirk: the projected query (bias included) is scaled by head_dim ** -0.5 before q @ k; the
        # attention below then runs with scale 1. Never scale twice.
        q = self._split_heads(self.q_proj(hidden_states) * self.scaling)  # B T N H
        k = self._split_heads(self.k_proj(hidden_states))  # B T N H
        v = self._split_heads(self.v_proj(hidden_states))  # B T N H
        if past_key_value is not None:  # static cache: write at the cache index; attention spans all S slots
            k, v = past_key_value.update(k, v)  # B S N H
        scores = jnp.einsum("btnh,bsnh->bnts", q, k)  # B N T S
        probs = masked_softmax(scores, mask)  # B N T S
        attn = jnp.einsum("bnts,bsnh->btnh", self.dropout(probs, deterministic), v)  # B T N H
        b, t, _, _ = attn.shape
        attn = attn.reshape(b, t, -1)  # B T N H -> B T D
        return self.out_proj(attn), (k, v), probs if output_attentions else None


class OPTDecoderLayer(_OPTLinen):
    def setup(self):
        config = self.config
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = nn.Dropout(config.dropout)
        self.activation_fn = ACTIVATIONS[config.activation_function]
        self.self_attn = self.child(OPTAttention)
        self.self_attn_layer_norm = self.layer_norm()
        self.fc1 = self.dense(config.ffn_dim, config.enable_bias)
        self.fc2 = self.dense(config.hidden_size, config.enable_bias)
        self.final_layer_norm = self.layer_norm()

    def __call__(self, hidden_states, mask, past_key_value=None, output_attentions=False, deterministic=True):
        # OPT quirk: opt-350m (do_layer_norm_before=False) is post-LN; every other size is pre-LN.
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, present, probs = self.self_attn(
            hidden_states, mask, past_key_value, output_attentions, deterministic
        )
        hidden_states = residual + self.dropout(hidden_states, deterministic)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))  # B T D -> B T F -> B T D
        hidden_states = residual + self.dropout(hidden_states, deterministic)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, present, probs


class OPTDecoderLayerCollection(_OPTLinen):
    """The L layers under one `layers` scope, named "0" .. "L-1" (HF's Flax layout; torch's nn.ModuleList)."""

    def setup(self):
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layers = [
            OPTDecoderLayer(self.config, **kwargs, name=str(i)) for i in range(self.config.num_hidden_layers)
        ]

    def __iter__(self):
        return iter(self.layers)


def _lookup_without_pad_gradient(embed: nn.Embed, input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """B T E embeddings of the ids; the pad token's lookups pass no gradient to its row, as HF's (torch's)
    `nn.Embedding(padding_idx=pad)`: fine-tuning on padded batches moves the same weights in every framework.
    The values are the table's rows either way."""
    embeds = embed(input_ids)
    if pad_token_id is None:
        return embeds
    # OPT quirk: HF's embed_tokens is an nn.Embedding(padding_idx=pad_token_id): its lookups of the pad token
    # pass no gradient to the pad row; a tied LM head's own gradient on that row still flows, as in HF.
    return jnp.where((input_ids == pad_token_id)[..., None], lax.stop_gradient(embeds), embeds)


class OPTDecoder(_OPTLinen):
    def setup(self):
        config = self.config
        self.dropout = nn.Dropout(config.dropout)
        embed = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=nn.initializers.normal(config.init_std)
        )
        self.embed_tokens = nn.Embed(config.vocab_size, config.word_embed_proj_dim, **embed)
        rows = config.max_position_embeddings + OPTLearnedPositionalEmbedding.offset
        self.embed_positions = OPTLearnedPositionalEmbedding(rows, config.hidden_size, **embed)
        # OPT quirk: opt-350m embeds tokens in E = word_embed_proj_dim != D; project_in maps E -> D before the
        # positions are added, project_out maps D -> E after the final norm.
        if config.has_projection:
            self.project_out = self.dense(config.word_embed_proj_dim, use_bias=False)
            self.project_in = self.dense(config.hidden_size, use_bias=False)
        else:
            self.project_out = self.project_in = None
        if config.has_final_layer_norm:
            self.final_layer_norm = self.layer_norm()
        else:
            self.final_layer_norm = None
        self.layers = self.child(OPTDecoderLayerCollection)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        output_attentions=False,
        output_hidden_states=False,
        deterministic=True,
    ) -> BaseModelOutputWithPast:
        check_ids_or_embeds(input_ids, inputs_embeds)
        if input_ids is not None and input_ids.ndim == 1:
            input_ids = input_ids[None]  # T -> 1 T, as HF does
        past_length = past_key_values.index if past_key_values is not None else 0
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        _validate(self.config, input_ids, attention_mask, position_ids, past_key_values, (batch, length))
        if inputs_embeds is None:
            inputs_embeds = _lookup_without_pad_gradient(self.embed_tokens, input_ids, self.config.pad_token_id)
        if attention_mask is None:
            key_length = past_key_values.max_length if past_key_values is not None else length
            attention_mask = jnp.ones((batch, key_length), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        cache_position = past_length + jnp.arange(length)  # the slots of the new tokens
        if position_ids is None:
            position_ids = make_position_ids(attention_mask, cache_position)
        mask = make_attention_mask(attention_mask, cache_position)  # B 1 T S

        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)  # B T E -> B T D
        hidden_states = inputs_embeds + self.embed_positions(position_ids).astype(inputs_embeds.dtype)
        hidden_states = self.dropout(hidden_states, deterministic)

        all_hidden, all_attn, presents = [], [], []
        for i, layer in enumerate(self.layers):
            all_hidden.append(hidden_states)
            past = past_key_values.layer(i) if past_key_values is not None else None
            hidden_states, present, probs = layer(hidden_states, mask, past, output_attentions, deterministic)
            presents.append(present)
            all_attn.append(probs)

        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)  # B T D -> B T E
        # As HF: L + 1 entries, each layer's input, then the final (normed, projected) state.
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values.advanced(presents, length) if past_key_values is not None else None,
            hidden_states=(*all_hidden, hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )


def _validate(config, input_ids, attention_mask, position_ids, past_key_values, batch_and_length):
    _, length = batch_and_length
    _check_shapes(attention_mask, position_ids, past_key_values, batch_and_length)
    if any(isinstance(x, jax.core.Tracer) for x in (input_ids, attention_mask, position_ids)):
        return  # inside a jit the values are symbolic; shapes were checked above
    past_length = past_key_values.past_length if past_key_values is not None else 0
    if past_length is None:
        return  # a traced cache index: the values cannot be placed

    def host(x):
        return None if x is None else np.asarray(x)

    mask = None if attention_mask is None else host(attention_mask)[:, : past_length + length]
    validate_inputs(config, host(input_ids), mask, host(position_ids), past_length, batch_and_length)


def _check_shapes(attention_mask, position_ids, past_key_values, batch_and_length):
    """Shapes are static even inside a jit, so they are checked always (and a concrete cache's room)."""
    mask_shape = None if attention_mask is None else tuple(attention_mask.shape)
    position_shape = None if position_ids is None else tuple(position_ids.shape)
    if past_key_values is not None:
        past_key_values.check(batch_and_length, mask_shape)  # HF Flax's contract: the mask covers every cache slot
        mask_shape = None
    check_shapes(mask_shape, position_shape, 0, batch_and_length)


class FlaxOPTModule(_OPTLinen):
    """The Linen module of `FlaxOPTModel`: the bare decoder under `decoder` (HF's `FlaxOPTModule`)."""

    def setup(self):
        self.decoder = self.child(OPTDecoder)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        output_attentions=False,
        output_hidden_states=False,
        deterministic=True,
    ) -> BaseModelOutputWithPast:
        return self.decoder(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            deterministic,
        )


class FlaxOPTForCausalLMModule(_OPTLinen):
    """The Linen module of `FlaxOPTForCausalLM`; `lm_head` has params only when the config unties it."""

    def setup(self):
        self.model = self.child(FlaxOPTModule)
        # OPT quirk: the LM head works in E = word_embed_proj_dim space and is tied to embed_tokens.
        if not self.config.tie_word_embeddings:
            self.lm_head = self.dense(self.config.vocab_size, use_bias=False)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        output_attentions=False,
        output_hidden_states=False,
        deterministic=True,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            deterministic,
        )
        hidden_states = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        if self.config.tie_word_embeddings:
            # `embed_tokens.attend` written out, contracting the table's last dimension directly: `attend`'s
            # `query @ table.T` puts a transpose of the V E table in the program, and XLA CPU then fuses it, with the
            # final layer norm, into a loop instead of calling its matrix-vector kernel. Measured alone at batch 1
            # (opt-125m): 6.4 ms as `attend`, 4.3 ms this way, of a ~29 ms decode step.
            table = self.model.decoder.embed_tokens.embedding.astype(self.dtype)  # V E
            hidden_states = hidden_states.astype(self.dtype)
            logits = lax.dot_general(hidden_states, table, (((hidden_states.ndim - 1,), (1,)), ((), ())))  # B T V
        else:
            logits = self.lm_head(hidden_states)  # B T E -> B T V
        return CausalLMOutputWithPast(None, logits, out.past_key_values, out.hidden_states, out.attentions)


def last_non_pad_index(input_ids, pad_token_id, batch_size):
    """The position each row is pooled at (B, or -1 for the last); HF's rule is `opt_core.heads.pools_last_position`."""
    if pools_last_position(pad_token_id, batch_size, input_ids is not None):
        return -1
    non_pad = (input_ids != pad_token_id).astype(jnp.int32)
    positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
    return (positions * non_pad).argmax(-1)


class FlaxOPTForSequenceClassificationModule(_OPTLinen):
    """The Linen module of `FlaxOPTForSequenceClassification`."""

    def setup(self):
        self.num_labels = self.config.num_labels
        self.model = self.child(FlaxOPTModule)
        self.score = self.dense(self.num_labels, use_bias=False)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        output_attentions=False,
        output_hidden_states=False,
        deterministic=True,
    ) -> SequenceClassifierOutputWithPast:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            deterministic,
        )
        logits = self.score(out.last_hidden_state)  # B T E -> B T C
        batch = logits.shape[0]
        last = last_non_pad_index(input_ids, self.config.pad_token_id, batch)
        pooled = logits[jnp.arange(batch), last]  # B C
        return SequenceClassifierOutputWithPast(None, pooled, out.past_key_values, out.hidden_states, out.attentions)


class FlaxOPTForQuestionAnsweringModule(_OPTLinen):
    """The Linen module of `FlaxOPTForQuestionAnswering`."""

    def setup(self):
        self.model = self.child(FlaxOPTModule)
        # HF's QA head is a plain nn.Linear: it has a bias whatever `enable_bias` says.
        self.qa_outputs = self.dense(2)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        output_attentions=False,
        output_hidden_states=False,
        deterministic=True,
    ) -> QuestionAnsweringModelOutput:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            deterministic,
        )
        logits = self.qa_outputs(out.last_hidden_state)  # B T E -> B T 2
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        return QuestionAnsweringModelOutput(None, start_logits, end_logits, out.hidden_states, out.attentions)


# ----- the public models: HF FlaxPreTrainedModel-style wrappers holding config, Linen module and params


class FlaxOPTModel(FlaxPreTrainedOPT):
    """The bare OPT decoder: last hidden states (B T E), HF's `FlaxOPTModel`.

    Args:
        config: the model's OPTConfig.
        dtype: the compute dtype (float32 by default).
        param_dtype: the dtype of freshly initialised params (float32 by default).
        seed: the seed of the fresh params; `_do_init=False` skips initialising them.
    """

    head = "base"
    module_class = FlaxOPTModule


class FlaxOPTForCausalLM(FlaxPreTrainedOPT, GenerationMixin):
    """OPT with its language-model head (tied to `embed_tokens` unless the config unties it).

    Args: as `FlaxOPTModel`. `__call__` also takes `logits_to_keep` (logits of the last n positions only).
    """

    head = "causal_lm"
    module_class = FlaxOPTForCausalLMModule


class FlaxOPTForSequenceClassification(FlaxPreTrainedOPT):
    """OPT with a linear classifier read at each row's last non-pad token.

    Args: as `FlaxOPTModel`; the config's `num_labels` / `id2label` set the classes.
    """

    head = "sequence_classification"
    module_class = FlaxOPTForSequenceClassificationModule


class FlaxOPTForQuestionAnswering(FlaxPreTrainedOPT):
    """OPT with a span-extraction head: start and end logits per token.

    Args: as `FlaxOPTModel`.
    """

    head = "question_answering"
    module_class = FlaxOPTForQuestionAnsweringModule
