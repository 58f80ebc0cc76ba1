"""The server's step model for Flax: a static cache whose rows decode at their own positions, under `jax.jit`.

Siblings: `opt_serve/torch_step.py` (the reference, with the reasons), `opt_serve/tf_step.py`; the scheduler that
drives them is `opt_serve.engine`.

Both calls apply the model's Linen module with an `opt_flax.cache.KVCache` and explicit positions:
* `prefill` runs one prompt, right-padded to a power-of-two bucket (one compilation per bucket, not per length),
  into a batch-of-one cache of S slots, then writes that row into the batch's cache. The padded tail is causal
  future to every real token, masked out, and overwritten by the row's decode steps before any of them reads it.
* `decode` writes each row's keys and values at that row's own position (`RowSlotCache`), with the positions as
  `position_ids` and a mask of each row's slots 0 .. position. One compilation serves every step; the cache
  buffers are donated, so XLA updates them in place.

Shapes: B rows (slots), S max length, N heads, H head dim, P a prompt's bucket, V vocab.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from opt_flax.cache import KVCache
from opt_flax.decode_layout import DecodeLayout
from opt_serve.engine import pad_to_slots, padded_prompt


@flax.struct.dataclass
class RowLayerCache:
    """One layer's slots; each row's new key and value go to that row's own slot."""

    k: jax.Array  # B S N H
    v: jax.Array  # B S N H
    slots: jax.Array  # B int32

    def update(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """B 1 N H new keys and values -> the layer's B S N H."""
        rows = jnp.arange(k.shape[0])
        return self.k.at[rows, self.slots].set(k[:, 0].astype(self.k.dtype)), self.v.at[rows, self.slots].set(
            v[:, 0].astype(self.v.dtype)
        )


@flax.struct.dataclass
class RowSlotCache(KVCache):
    """A KVCache whose index is its last slot (so the causal mask allows every slot: the attention mask decides)
    and whose layers write row b at `slots[b]`."""

    slots: jax.Array = None  # B int32

    def layer(self, i: int) -> RowLayerCache:
        return RowLayerCache(*self.key_values[i], self.slots)


class FlaxStepModel:
    """`opt_serve.engine.StepModel` for an `opt_flax.FlaxOPTForCausalLM`.

    Args:
        model: the loaded causal LM (an active adapter is applied, as `generate` applies it).
        slots: B, the rows decoded together.
        max_length: S, positions per row.
    """

    def __init__(self, model, slots: int, max_length: int):
        self.module, self.config, self.dtype = model.module, model.config, model.dtype
        self.slots, self.max_length = slots, max_length
        self.params = DecodeLayout().params_for(model.params, slots)  # what generate decodes `slots` rows with
        self.key_values = model.init_cache(slots, max_length).key_values
        self._decode = jax.jit(self._decode_program, donate_argnums=(1,))
        self._prefill = jax.jit(self._prefill_program)
        self._put_row = jax.jit(_put_row, donate_argnums=(0,))

    def prefill(self, slot: int, prompt: np.ndarray, new_tokens: int, all_logits: bool) -> np.ndarray:
        length = len(prompt)
        padded, mask = padded_prompt(prompt, self.max_length)
        logits, row = self._prefill(self.params, padded, mask)
        self.key_values = self._put_row(self.key_values, row, np.int32(slot))
        logits = np.asarray(logits[:length])  # P V -> T0 V
        return logits if all_logits else logits[-1:]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        rows = len(tokens)
        tokens, positions = pad_to_slots(tokens, self.slots), pad_to_slots(positions, self.slots)  # one program
        logits, self.key_values = self._decode(
            self.params, self.key_values, tokens.astype(np.int32), positions.astype(np.int32)
        )
        return np.asarray(logits)[:rows]

    def _prefill_program(self, params, ids, mask):
        cache = KVCache.create(self.config, 1, self.max_length, self.dtype)
        out = self.module.apply({"params": params}, ids, mask, None, cache)
        return out.logits[0].astype(jnp.float32), out.past_key_values.key_values  # P V, L of (1 S N H) x 2

    def _decode_program(self, params, key_values, tokens, positions):
        mask = (jnp.arange(self.max_length)[None, :] <= positions[:, None]).astype(jnp.int32)  # B S
        cache = RowSlotCache(key_values, jnp.int32(self.max_length - 1), positions)
        out = self.module.apply({"params": params}, tokens[:, None], mask, positions[:, None], cache)
        return out.logits[:, -1].astype(jnp.float32), out.past_key_values.key_values


def _put_row(key_values, row, slot):
    """The batch's cache with row `slot` replaced by a batch-of-one cache's only row."""
    return jax.tree.map(lambda batch, one: batch.at[slot].set(one[0]), key_values, row)
