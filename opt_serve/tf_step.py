"""The server's step model for Keras (TensorFlow): a static cache whose rows decode at their own positions,
compiled with `tf.function(jit_compile=True)`.

Siblings: `opt_serve/torch_step.py` (the reference, with the reasons), `opt_serve/flax_step.py` (the same bucketed
prefill); the scheduler that drives them is `opt_serve.engine`.

Both calls run the Keras model with an `opt_tf.cache.KVCache` and explicit positions:
* `prefill` runs one prompt, right-padded to a power-of-two bucket (one XLA program per bucket), into a
  batch-of-one cache of S slots, then writes that row into the batch's cache.
* `decode` writes each row's keys and values at that row's own position (`RowSlotCache.layer` hands each layer the
  B 1 slots, which `opt_tf.cache.write_slots` broadcasts per row), with the positions as `position_ids` and a mask
  of each row's slots 0 .. position. One XLA program serves every step.

Shapes: B rows (slots), S max length, N heads, H head dim, P a prompt's bucket, V vocab.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from opt_serve.engine import pad_to_slots, padded_prompt
from opt_tf.cache import KVCache, LayerCache


class RowSlotCache(KVCache):
    """A KVCache whose index is its last slot (so the causal mask allows every slot: the attention mask decides)
    and whose layers write row b at `slots[b]`."""

    def __init__(self, key_values: tuple, index, slots: tf.Tensor):
        super().__init__(key_values, index)
        self.slots = slots  # B int32

    def layer(self, i: int) -> LayerCache:
        return LayerCache(*self.key_values[i], self.slots[:, None])  # B 1: one slot per row


class TFStepModel:
    """`opt_serve.engine.StepModel` for an `opt_tf.TFOPTForCausalLM`.

    Args:
        model: the loaded causal LM (an active adapter applies in its layers).
        slots: B, the rows decoded together.
        max_length: S, positions per row.
    """

    def __init__(self, model, slots: int, max_length: int):
        self.model, self.slots, self.max_length = model, slots, max_length
        self.key_values = model.init_cache(slots, max_length).key_values
        self._decode = tf.function(self._decode_program, jit_compile=True)
        self._prefill = tf.function(self._prefill_program, jit_compile=True)

    def prefill(self, slot: int, prompt: np.ndarray, new_tokens: int, all_logits: bool) -> np.ndarray:
        length = len(prompt)
        padded, mask = padded_prompt(prompt, self.max_length)
        logits, row = self._prefill(tf.constant(padded), tf.constant(mask))
        at = tf.constant([[slot]])
        self.key_values = tuple(
            (tf.tensor_scatter_nd_update(k, at, row_k), tf.tensor_scatter_nd_update(v, at, row_v))
            for (k, v), (row_k, row_v) in zip(self.key_values, row)
        )
        logits = logits.numpy()[:length]  # P V -> T0 V
        return logits if all_logits else logits[-1:]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        rows = len(tokens)
        tokens, positions = pad_to_slots(tokens, self.slots), pad_to_slots(positions, self.slots)  # one program
        logits, self.key_values = self._decode(
            tf.constant(tokens, tf.int32), tf.constant(positions, tf.int32), self.key_values
        )
        return logits.numpy()[:rows]

    def _prefill_program(self, ids, mask):
        out = self.model(ids, attention_mask=mask, past_key_values=self.model.init_cache(1, self.max_length))
        return tf.cast(out.logits[0], tf.float32), out.past_key_values.key_values  # P V, L of (1 S N H) x 2

    def _decode_program(self, tokens, positions, key_values):
        mask = tf.cast(tf.range(self.max_length)[None, :] <= positions[:, None], tf.int32)  # B S
        cache = RowSlotCache(key_values, tf.constant(self.max_length - 1), positions)
        out = self.model(tokens[:, None], attention_mask=mask, position_ids=positions[:, None], past_key_values=cache)
        return tf.cast(out.logits[:, -1], tf.float32), out.past_key_values.key_values
