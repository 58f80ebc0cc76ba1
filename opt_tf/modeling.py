"""OPT in TensorFlow/Keras 3: attention, decoder layer, decoder, `TFOPTModel` and the three heads, top to bottom.

Siblings: `opt_torch/modeling.py` (PyTorch) and `opt_flax/modeling.py` (Flax) have the same classes, attributes,
argument order and comments; a diff between them shows framework idioms only. Attribute names equal HF's
checkpoint names, so a canonical name of `opt_core.weights` is the attribute path to its variable.

Shapes: B batch, T query length, S key/cache length, N heads, H head dim, D hidden, E word-embedding dim,
F ffn dim, V vocab, L layers, C labels.

Caches (`opt_tf.cache`): `past_key_values` is HF's layout, per layer (k, v) each B N S H; a call with
`use_cache=True` returns the grown tuple. For compiled decoding, `past_key_values` is instead a `KVCache`
(`model.init_cache(B, S)`, as HF Flax): per layer (k, v) each B S N H preallocated to S slots, and the write index.
A call writes the new keys and values at the index and returns the updated cache; `attention_mask` covers all S
slots (0 for slots not written yet). Shapes never change, so one `tf.function(jit_compile=True)` step serves a whole
decoding loop, inside a `tf.while_loop` too. Either way attention receives its layer's view of the cache and calls
its `update`.

Bad input raises `opt_core.errors.InputError` when the model runs eagerly. Inside `tf.function` the values are
symbolic and cannot be checked: under XLA an out-of-range token id is silently clamped to the table's last row
(XLA's gather semantics); without XLA, `tf.gather` raises on CPU but silently gives zeros on GPU.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core import outputs  # noqa: E402
from opt_core.config import OPTConfig  # noqa: E402
from opt_core.heads import pools_last_position, problem_type  # noqa: E402
from opt_core.inputs import check_ids_or_embeds, validate_inputs  # noqa: E402
from opt_core.masks import MASKED_SCORE  # noqa: E402
from opt_tf.cache import DynamicKVCache, KVCache  # noqa: E402
from opt_tf.decode_layout import OPTDense  # noqa: E402
from opt_tf.generation import GenerationMixin  # noqa: E402
from opt_tf.pretrained import PreTrainedOPT  # noqa: E402
from opt_tf.shapes import dims  # noqa: E402


def _nestable(cls):
    """The output class made a nest for TF (its custom-nest protocol), so `tf.function` can return it."""

    def flatten(self):
        return (), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def unflatten(subclass, metadata, components):
        return subclass(*components)

    namespace = {"__tf_flatten__": flatten, "__tf_unflatten__": classmethod(unflatten), "__module__": __name__}
    return type(cls.__name__, (cls,), namespace)


BaseModelOutputWithPast = _nestable(outputs.BaseModelOutputWithPast)
CausalLMOutputWithPast = _nestable(outputs.CausalLMOutputWithPast)
SequenceClassifierOutputWithPast = _nestable(outputs.SequenceClassifierOutputWithPast)
QuestionAnsweringModelOutput = _nestable(outputs.QuestionAnsweringModelOutput)

ACTIVATIONS = {
    "relu": tf.nn.relu,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * tf.sigmoid(1.702 * x),
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
    "tanh": tf.tanh,
}


def dense(units: int, use_bias: bool, name: str, dtype, initializer) -> OPTDense:
    # OPTDense: a Dense that generate's programs can hand [out, in] kernels to (opt_tf.decode_layout).
    return OPTDense(units, use_bias=use_bias, kernel_initializer=initializer, name=name, dtype=dtype)


class OPTLayerNorm(keras.layers.LayerNormalization):
    """Keras' LayerNormalization over the last axis, computed with Keras' own operations in Keras' order (so the
    same numbers and gradients), without the reshapes and conversions its general-axis code adds to every traced
    call: the model's 25 norms were a fifth of `generate`'s trace (`benchmarks/first_call.py`)."""

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        if x.dtype in (tf.float16, tf.bfloat16):  # statistics in float32 whatever the policy, as Keras
            x = tf.cast(x, tf.float32)
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)  # tf.nn.moments' two means
        variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axis=-1, keepdims=True)
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * tf.cast(self.gamma, x.dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + tf.cast(self.beta, x.dtype)
        return tf.cast(x * inv + shift, self.compute_dtype)


def layer_norm(config: OPTConfig, name: str, dtype) -> OPTLayerNorm:
    # Computes in float32 whatever the policy (as Keras' LayerNormalization); torch's epsilon.
    affine = config.layer_norm_elementwise_affine
    return OPTLayerNorm(epsilon=1e-5, center=affine, scale=affine, name=name, dtype=dtype)


def make_position_ids(attention_mask: tf.Tensor, past_length, query_length) -> tf.Tensor:
    # OPT quirk: positions count real tokens only, `cumsum(mask) * mask - 1` over the full (past + current) mask,
    # so left padding does not shift them; padded slots get -1. B S -> B T
    positions = tf.cumsum(attention_mask, axis=1) * attention_mask - 1
    # A gather, not tf.slice: XLA takes a slice's start as a compile-time constant and recompiles per value.
    return tf.gather(positions, past_length + tf.range(query_length), axis=1)  # B T


def make_attention_mask(attention_mask: tf.Tensor, query_length, past_length) -> tf.Tensor:
    """B S padding mask -> B 1 T S boolean mask, True where query t may attend key s (causal and not padded)."""
    key_length = dims(attention_mask)[1]
    query_pos = tf.range(query_length)[:, None] + past_length
    key_pos = tf.range(key_length)[None, :]
    return (key_pos <= query_pos)[None, None] & tf.cast(attention_mask, tf.bool)[:, None, None, :]


def masked_softmax(scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """B N T S scores and B 1 T S mask -> attention probs in the scores' dtype, 0 where the mask is False."""
    # Masks are applied once, through a select, never added (opt_core.masks: HF's fp16 NaN, issue #17433); the
    # softmax runs in fp32, and the select after the upcast, so the fill is below every half-precision score.
    probs = tf.cast(tf.nn.softmax(tf.where(mask, tf.cast(scores, tf.float32), MASKED_SCORE), axis=-1), scores.dtype)
    # A query with nothing to attend to (a padded slot) gets zero attention, as torch's SDPA gives and so
    # HF's default; this matters for the loss, where a pad slot's logits predict the first real token.
    return tf.where(mask, probs, tf.zeros_like(probs))


class OPTLearnedPositionalEmbedding(keras.layers.Embedding):
    """OPT's position table: max_position_embeddings + 2 rows, looked up at position + 2."""

    # OPT quirk: metaseq reserved rows 0 and 1, so positions are looked up at `+ 2`.
    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int, **kwargs):
        super().__init__(num_positions + self.offset, embedding_dim, **kwargs)

    def call(self, position_ids):
        return super().call(position_ids + self.offset)  # B T -> B T D


class OPTAttention(keras.layers.Layer):
    def __init__(self, config: OPTConfig, initializer, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout = keras.layers.Dropout(config.attention_dropout, dtype=self.dtype_policy)
        d, bias, policy = config.hidden_size, config.enable_bias, self.dtype_policy
        self.k_proj = dense(d, bias, "k_proj", policy, initializer)
        self.v_proj = dense(d, bias, "v_proj", policy, initializer)
        self.q_proj = dense(d, bias, "q_proj", policy, initializer)
        self.out_proj = dense(d, bias, "out_proj", policy, initializer)

    def build(self, input_shape):
        for proj in (self.k_proj, self.v_proj, self.q_proj, self.out_proj):
            proj.build(input_shape)

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        b, t, _ = dims(x)
        return tf.reshape(x, (b, t, self.num_heads, self.head_dim))  # B T D -> B T N H

    def call(self, hidden_states, mask, past_key_value=None, output_attentions=False, training=False):
        # OPT quirk: the projected query (bias included) is scaled by head_dim ** -0.5 before q @ k; the
        # attention below then runs with scale 1. Never scale twice.
        q = self._split_heads(self.q_proj(hidden_states) * self.scaling)  # B T N H
        k = self._split_heads(self.k_proj(hidden_states))  # B T N H
        v = self._split_heads(self.v_proj(hidden_states))  # B T N H
        if past_key_value is not None:  # this layer's cache (opt_tf.cache): stores k, v, returns all so far
            k, v = past_key_value.update(k, v)  # B S N H
        scores = tf.einsum("btnh,bsnh->bnts", q, tf.cast(k, q.dtype))  # B N T S
        probs = masked_softmax(scores, mask)  # B N T S
        attn = tf.einsum("bnts,bsnh->btnh", self.dropout(probs, training=training), tf.cast(v, q.dtype))  # B T N H
        b, t, _, _ = dims(attn)
        attn = tf.reshape(attn, (b, t, self.num_heads * self.head_dim))  # B T N H -> B T D
        return self.out_proj(attn), (k, v), probs if output_attentions else None


class OPTDecoderLayer(keras.layers.Layer):
    def __init__(self, config: OPTConfig, initializer, **kwargs):
        super().__init__(**kwargs)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = keras.layers.Dropout(config.dropout, dtype=self.dtype_policy)
        self.activation_fn = ACTIVATIONS[config.activation_function]
        policy = self.dtype_policy
        self.self_attn = OPTAttention(config, initializer, name="self_attn", dtype=policy)
        self.self_attn_layer_norm = layer_norm(config, "self_attn_layer_norm", policy)
        self.fc1 = dense(config.ffn_dim, config.enable_bias, "fc1", policy, initializer)
        self.fc2 = dense(config.hidden_size, config.enable_bias, "fc2", policy, initializer)
        self.final_layer_norm = layer_norm(config, "final_layer_norm", policy)

    def build(self, input_shape):
        self.self_attn.build(input_shape)
        self.self_attn_layer_norm.build(input_shape)
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.fc1.units))
        self.final_layer_norm.build(input_shape)

    def call(self, hidden_states, mask, past_key_value=None, output_attentions=False, training=False):
        # OPT quirk: opt-350m (do_layer_norm_before=False) is post-LN; every other size is pre-LN.
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, present, probs = self.self_attn(
            hidden_states, mask, past_key_value=past_key_value, output_attentions=output_attentions
        )
        hidden_states = residual + self.dropout(hidden_states, training=training)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))  # B T D -> B T F -> B T D
        hidden_states = residual + self.dropout(hidden_states, training=training)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, present, probs


def _lookup_without_pad_gradient(
    embed: keras.layers.Embedding, input_ids: tf.Tensor, pad_token_id: int | None
) -> tf.Tensor:
    """B T E embeddings of the ids; the pad token's lookups pass no gradient to its row, as HF's (torch's)
    `nn.Embedding(padding_idx=pad)`: fine-tuning on padded batches moves the same weights in every framework.
    The values are the table's rows either way."""
    embeds = embed(input_ids)
    if pad_token_id is None:
        return embeds
    # OPT quirk: HF's embed_tokens is an nn.Embedding(padding_idx=pad_token_id): its lookups of the pad token
    # pass no gradient to the pad row; a tied LM head's own gradient on that row still flows, as in HF.
    return tf.where((input_ids == pad_token_id)[..., None], tf.stop_gradient(embeds), embeds)


class OPTDecoder(keras.layers.Layer):
    def __init__(self, config: OPTConfig, initializer, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dropout = keras.layers.Dropout(config.dropout, dtype=self.dtype_policy)
        policy = self.dtype_policy
        self.embed_tokens = keras.layers.Embedding(
            config.vocab_size,
            config.word_embed_proj_dim,
            embeddings_initializer=initializer,
            name="embed_tokens",
            dtype=policy,
        )
        self.embed_positions = OPTLearnedPositionalEmbedding(
            config.max_position_embeddings,
            config.hidden_size,
            embeddings_initializer=initializer,
            name="embed_positions",
            dtype=policy,
        )
        # OPT quirk: opt-350m embeds tokens in E = word_embed_proj_dim != D; project_in maps E -> D before the
        # positions are added, project_out maps D -> E after the final norm.
        if config.has_projection:
            self.project_out = dense(config.word_embed_proj_dim, False, "project_out", policy, initializer)
            self.project_in = dense(config.hidden_size, False, "project_in", policy, initializer)
        else:
            self.project_out = self.project_in = None
        if config.has_final_layer_norm:
            self.final_layer_norm = layer_norm(config, "final_layer_norm", policy)
        else:
            self.final_layer_norm = None
        self.layers = [
            OPTDecoderLayer(config, initializer, name=f"layers.{i}", dtype=policy)
            for i in range(config.num_hidden_layers)
        ]

    def build(self, input_shape=None):
        d, e = self.config.hidden_size, self.config.word_embed_proj_dim
        self.embed_tokens.build()
        self.embed_positions.build()
        for layer, width in ((self.project_in, e), (self.project_out, d), (self.final_layer_norm, d)):
            if layer is not None:
                layer.build((None, None, width))
        for layer in self.layers:
            layer.build((None, None, d))

    def call(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=False,
        output_attentions=False,
        output_hidden_states=False,
        training=False,
    ) -> BaseModelOutputWithPast:
        input_ids = _new_tokens(input_ids, inputs_embeds)
        cache = _cache(past_key_values, use_cache)
        if tf.executing_eagerly():
            _validate(self.config, input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = _lookup_without_pad_gradient(self.embed_tokens, input_ids, self.config.pad_token_id)
        batch, length = dims(inputs_embeds)[:2]
        past_length = _past_length(cache)
        attention_mask = _padding_mask(attention_mask, cache, past_length, (batch, length))  # B S
        if position_ids is None:
            position_ids = make_position_ids(attention_mask, past_length, length)
        mask = make_attention_mask(attention_mask, length, past_length)  # B 1 T S

        hidden_states = self._embed(inputs_embeds, position_ids, training)
        hidden_states, presents, all_hidden, all_attn = self._run_layers(hidden_states, mask, cache, output_attentions)
        hidden_states = self._finish(hidden_states)
        # As HF: L + 1 entries, each layer's input, then the final (normed, projected) state.
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=_returned_cache(cache, presents, length, use_cache),
            hidden_states=(*all_hidden, hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )

    def _embed(self, inputs_embeds, position_ids, training) -> tf.Tensor:
        """The new tokens' embeddings (projected to D) plus their positions' (B T D)."""
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)  # B T E -> B T D
        hidden_states = inputs_embeds + tf.cast(self.embed_positions(position_ids), inputs_embeds.dtype)
        return self.dropout(hidden_states, training=training)

    def _run_layers(self, hidden_states, mask, cache, output_attentions):
        """The L layers: the last one's output, each layer's updated (k, v), input and attention probs (or None)."""
        all_hidden, all_attn, presents = [], [], []
        for i, layer in enumerate(self.layers):
            all_hidden.append(hidden_states)
            past = cache.layer(i) if cache is not None else None
            hidden_states, present, probs = layer(
                hidden_states, mask, past_key_value=past, output_attentions=output_attentions
            )
            presents.append(present)
            all_attn.append(probs)
        return hidden_states, presents, all_hidden, all_attn

    def _finish(self, hidden_states) -> tf.Tensor:
        """The final norm, then project_out (B T D -> B T E)."""
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)  # B T D -> B T E
        return hidden_states


def _new_tokens(input_ids, inputs_embeds):
    """input_ids as a B T tensor (a lone row of T ids is a batch of one, as HF), or None with inputs_embeds."""
    check_ids_or_embeds(input_ids, inputs_embeds)
    if input_ids is None:
        return None
    input_ids = tf.convert_to_tensor(input_ids)
    return input_ids[None] if input_ids.shape.rank == 1 else input_ids  # T -> 1 T, as HF does


def _cache(past_key_values, use_cache):
    """The cache a call updates: a KVCache as given, HF's tuples in a DynamicKVCache, or None."""
    if isinstance(past_key_values, KVCache):
        return past_key_values
    if past_key_values or use_cache:
        return DynamicKVCache(past_key_values)
    return None


def _returned_cache(cache, presents, length, use_cache):
    """What a call returns as past_key_values: the advanced KVCache always; HF's tuples when use_cache."""
    if isinstance(cache, KVCache):
        return cache.advanced(presents, length)
    return cache.advanced(presents) if use_cache and cache is not None else None


def _past_length(cache):
    """Positions already cached: the static cache's write index, or the S of HF's B N S H tuple."""
    return tf.cast(cache.index, tf.int32) if cache is not None else 0


def _padding_mask(attention_mask, cache, past_length, batch_and_length):
    """The B S int32 padding mask; when None, every token so far (a static cache's slots beyond them are empty)."""
    if attention_mask is not None:
        return tf.cast(attention_mask, tf.int32)
    batch, length = batch_and_length
    key_length = cache.max_length if isinstance(cache, KVCache) else past_length + length
    return tf.cast(tf.broadcast_to(tf.range(key_length) < past_length + length, (batch, key_length)), tf.int32)


def _validate(config, input_ids, attention_mask, position_ids, cache, inputs_embeds):
    """Clear errors for bad input (`opt_core.inputs`) from host copies; a static cache checks the tokens fit."""

    def host(x):
        return None if x is None else tf.convert_to_tensor(x).numpy()

    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    past_length, mask = (cache.past_length if cache is not None else 0), host(attention_mask)
    if isinstance(cache, KVCache):  # its mask covers every slot: the cache checks its shape
        cache.check((batch, length), None if mask is None else mask.shape)
        mask = None if mask is None else mask[:, : past_length + length]
    validate_inputs(config, host(input_ids), mask, host(position_ids), past_length, (batch, length))


@keras.saving.register_keras_serializable(package="opt_tf")
class TFOPTModel(PreTrainedOPT):
    """The bare OPT decoder: last hidden states (B T E), HF's `OPTModel`, as a Keras 3 model.

    Args:
        config: the model's OPTConfig.
        **kwargs: Keras model arguments: `name`, `dtype` (a policy such as "mixed_bfloat16").
    """

    head = "base"

    def __init__(self, config: OPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.decoder = OPTDecoder(config, self.initializer, name="decoder", dtype=self.dtype_policy)
        self.build()

    def build(self, input_shape=None):
        self.decoder.build()

    def call(
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
        training=False,
    ):
        out = self.decoder(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=self.config.use_cache if use_cache is None else use_cache,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            training=training,
        )
        return out if return_dict is not False else out.to_tuple()


@keras.saving.register_keras_serializable(package="opt_tf")
class TFOPTForCausalLM(PreTrainedOPT, GenerationMixin):
    """OPT with its language-model head (tied to `embed_tokens` unless the config unties it), as a Keras 3 model.

    Args:
        config: the model's OPTConfig.
        **kwargs: Keras model arguments: `name`, `dtype` (a policy such as "mixed_bfloat16").
    """

    head = "causal_lm"

    def __init__(self, config: OPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.model = TFOPTModel(config, initializer=self.initializer, name="model", dtype=self.dtype_policy)
        # OPT quirk: the LM head works in E = word_embed_proj_dim space and is tied to embed_tokens.
        if config.tie_word_embeddings:
            self.lm_head = None  # logits from embed_tokens' table itself
        else:
            self.lm_head = dense(config.vocab_size, False, "lm_head", self.dtype_policy, self.initializer)
        self.build()

    def build(self, input_shape=None):
        if self.lm_head is not None:
            self.lm_head.build((None, None, self.config.word_embed_proj_dim))

    def call(
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
        training=False,
    ):
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
        )
        hidden_states = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        if self.lm_head is not None:
            logits = self.lm_head(hidden_states)  # B T E -> B T V
        else:
            table = tf.cast(self.get_input_embeddings().embeddings, hidden_states.dtype)  # V E
            # The table times the hidden states, transposed back, not `matmul(hidden, table, transpose_b=True)`:
            # under XLA the latter puts a transpose of the V E table
            # in the program, which XLA CPU fuses with the final layer norm into a loop instead of calling its
            # matrix-vector kernel (the same product in JAX: 6.4 ms that way, 4.3 ms contracting the table's last
            # dimension directly, of a ~30 ms decode step at batch 1).
            batch, length = tf.shape(hidden_states)[0], tf.shape(hidden_states)[1]
            flat = tf.reshape(hidden_states, (batch * length, -1))  # B*T E
            logits = tf.transpose(tf.matmul(table, flat, transpose_b=True))  # V B*T -> B*T V
            logits = tf.reshape(logits, (batch, length, -1))  # B T V
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def hf_loss(self, out, labels):
        return causal_lm_loss(out.logits, labels)


def causal_lm_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """HF's causal-LM loss: token t predicts label t + 1; label -100 is ignored; mean over counted tokens."""
    shift_logits = tf.cast(logits[:, :-1], tf.float32)  # B (T-1) V
    shift_labels = tf.cast(labels[:, 1:], tf.int32)
    return _cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def _cross_entropy(logits: tf.Tensor, labels: tf.Tensor, ignore_index: int) -> tf.Tensor:
    """torch's `cross_entropy(..., ignore_index)`: the mean over labels that are not ignored (0 when none is)."""
    counted = labels != ignore_index
    per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(counted, labels, 0), logits)
    counted = tf.cast(counted, per_token.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_token * counted), tf.reduce_sum(counted))


def last_non_pad_index(input_ids, pad_token_id, batch_size):
    """The position each row is pooled at (B, or -1 for the last); HF's rule is `opt_core.heads.pools_last_position`."""
    if pools_last_position(pad_token_id, batch_size, input_ids is not None):
        return -1
    non_pad = tf.cast(input_ids != pad_token_id, tf.int32)
    positions = tf.range(tf.shape(input_ids)[-1], dtype=tf.int32)
    return tf.argmax(positions * non_pad, axis=-1, output_type=tf.int32)


@keras.saving.register_keras_serializable(package="opt_tf")
class TFOPTForSequenceClassification(PreTrainedOPT):
    """OPT with a linear classifier read at each row's last non-pad token, as a Keras 3 model.

    Args:
        config: the model's OPTConfig; `num_labels` / `id2label` set the classes, `problem_type` the loss.
        **kwargs: Keras model arguments: `name`, `dtype` (a policy such as "mixed_bfloat16").
    """

    head = "sequence_classification"

    def __init__(self, config: OPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.num_labels = config.num_labels
        self.model = TFOPTModel(config, initializer=self.initializer, name="model", dtype=self.dtype_policy)
        self.score = dense(self.num_labels, False, "score", self.dtype_policy, self.initializer)
        self.build()

    def build(self, input_shape=None):
        self.score.build((None, None, self.config.word_embed_proj_dim))

    def call(
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
        training=False,
    ):
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
        )
        logits = self.score(out.last_hidden_state)  # B T E -> B T C
        batch, length = tf.shape(logits)[0], tf.shape(logits)[1]
        last = last_non_pad_index(input_ids, self.config.pad_token_id, logits.shape[0])
        last = tf.broadcast_to(tf.math.floormod(last, length), [batch])  # -1: the last position
        pooled = tf.gather(logits, last, axis=1, batch_dims=1)  # B T C -> B C
        loss = self._loss(pooled, labels) if labels is not None else None
        result = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def hf_loss(self, out, labels):
        return self._loss(out.logits, labels)

    def _loss(self, pooled: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        problem = problem_type(self.config, self.num_labels, labels.dtype.is_integer)
        pooled = tf.cast(pooled, tf.float32)
        if problem == "regression":
            if self.num_labels == 1:
                return tf.reduce_mean(
                    tf.square(tf.reshape(pooled, [-1]) - tf.cast(tf.reshape(labels, [-1]), tf.float32))
                )
            return tf.reduce_mean(tf.square(pooled - tf.cast(labels, tf.float32)))
        if problem == "single_label_classification":
            return _cross_entropy(pooled, tf.cast(tf.reshape(labels, [-1]), tf.int32), ignore_index=-100)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(labels, tf.float32), pooled))


@keras.saving.register_keras_serializable(package="opt_tf")
class TFOPTForQuestionAnswering(PreTrainedOPT):
    """OPT with a span-extraction head: start and end logits per token, as a Keras 3 model.

    Args:
        config: the model's OPTConfig.
        **kwargs: Keras model arguments: `name`, `dtype` (a policy such as "mixed_bfloat16").
    """

    head = "question_answering"

    def __init__(self, config: OPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.model = TFOPTModel(config, initializer=self.initializer, name="model", dtype=self.dtype_policy)
        self.qa_outputs = dense(2, True, "qa_outputs", self.dtype_policy, self.initializer)
        self.build()

    def build(self, input_shape=None):
        self.qa_outputs.build((None, None, self.config.word_embed_proj_dim))

    def call(
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
        training=False,
    ):
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
        )
        logits = self.qa_outputs(out.last_hidden_state)  # B T E -> B T 2
        start_logits, end_logits = tf.unstack(logits, axis=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        result = QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def hf_loss(self, out, labels):
        start_positions, end_positions = labels
        return span_loss(out.start_logits, out.end_logits, start_positions, end_positions)


def span_loss(start_logits, end_logits, start_positions, end_positions) -> tf.Tensor:
    """HF's QA loss: positions outside the sequence are clamped to T and ignored; mean of start and end."""
    ignored = tf.shape(start_logits)[1]
    start = tf.clip_by_value(tf.cast(tf.reshape(start_positions, [-1]), tf.int32), 0, ignored)
    end = tf.clip_by_value(tf.cast(tf.reshape(end_positions, [-1]), tf.int32), 0, ignored)
    return (
        _cross_entropy(tf.cast(start_logits, tf.float32), start, ignore_index=ignored)
        + _cross_entropy(tf.cast(end_logits, tf.float32), end, ignore_index=ignored)
    ) / 2
