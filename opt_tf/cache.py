"""The key/value caches of the Keras models: objects that own their update.

Siblings: `opt_torch/cache.py` and `opt_flax/cache.py` hold the same caches in their frameworks; the checks against
the inputs and the sizes (`opt_core.cache.StaticCacheShape`) are shared.

Attention receives one layer's view (`cache.layer(i)`) as its `past_key_value` and calls `past_key_value.update(k,
v)`, which returns all of that layer's keys and values so far. TF tensors are immutable, as JAX arrays: the decoder
collects the layers' updated keys and values and returns the next cache (`cache.advanced(key_values, length)`).

* `KVCache` preallocates per layer (k, v), each B S N H (S = max length), plus the write index, for compiled
  decoding (`model.init_cache(B, S)`, as HF Flax). The new keys and values are written at the index, so shapes never
  change and one `tf.function(jit_compile=True)` step serves a whole decoding loop. A TF nest (its custom-nest
  protocol), so it passes in and out of `tf.function` and `tf.while_loop`.
* `DynamicKVCache` wraps HF's `past_key_values` tuple, per layer (k, v) each B N S H, grown by concatenation: a call
  with `use_cache=True` returns the grown tuple, which users step with by hand.

Shapes: B batch, T new tokens, S cache length, N heads, H head dim, L layers.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from opt_core.cache import StaticCacheShape
from opt_core.config import OPTConfig
from opt_tf.shapes import dims


def write_slots(cache: tf.Tensor, new: tf.Tensor, cache_index) -> tf.Tensor:
    """Writes B T N H `new` into slots cache_index .. cache_index + T - 1 of the B S N H `cache` (`cache_index`: a
    scalar, or B 1 for a slot per row)."""
    batch, length = dims(new)[:2]
    if isinstance(batch, int) and isinstance(length, int):  # traced with static shapes: constants
        rows = np.repeat(np.arange(batch, dtype=np.int32)[:, None], length, axis=1)  # B T
        offsets = np.arange(length, dtype=np.int32)[None, :]  # 1 T
    else:
        rows = tf.broadcast_to(tf.range(batch)[:, None], (batch, length))
        offsets = tf.range(length)[None, :]
    slots = tf.broadcast_to(tf.cast(cache_index, tf.int32) + offsets, (batch, length))  # B T
    return tf.tensor_scatter_nd_update(cache, tf.stack([rows, slots], axis=-1), tf.cast(new, cache.dtype))


class LayerCache:
    """One layer's slots of a `KVCache` and the index the new tokens are written at (what its attention receives)."""

    def __init__(self, k: tf.Tensor, v: tf.Tensor, index):
        self.k, self.v, self.index = k, v, index  # B S N H, B S N H, () int32

    def update(self, k: tf.Tensor, v: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Writes the new tokens' k, v (B T N H) at the index; returns the layer's whole k, v (B S N H)."""
        return write_slots(self.k, k, self.index), write_slots(self.v, v, self.index)


class KVCache(StaticCacheShape):
    """The static cache: per layer (k, v), each B S N H with S the cache length, and the write index."""

    def __init__(self, key_values: tuple, index):
        self.key_values = key_values  # L of (k, v), each B S N H
        self.index = index  # () int32: positions written so far

    @classmethod
    def create(cls, config: OPTConfig, batch_size: int, max_length: int, dtype="float32") -> KVCache:
        shape = (batch_size, max_length, config.num_attention_heads, config.head_dim)  # B S N H
        layers = tuple((tf.zeros(shape, dtype), tf.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))
        return cls(layers, tf.zeros((), tf.int32))

    @property
    def past_length(self) -> int | None:
        """Positions written so far, or None inside a `tf.function` (where the index is symbolic)."""
        index = tf.get_static_value(self.index)
        return None if index is None else int(index)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(*self.key_values[i], self.index)

    def advanced(self, key_values, length) -> KVCache:
        """The cache after a call of `length` tokens wrote `key_values` (L of the layers' updated k, v)."""
        return KVCache(tuple(key_values), tf.cast(self.index, tf.int32) + length)

    def reorder(self, rows: tf.Tensor) -> KVCache:
        """The cache with its rows (axis 0 of every k and v) gathered: beams and candidates continue other rows."""
        return KVCache(tuple((tf.gather(k, rows), tf.gather(v, rows)) for k, v in self.key_values), self.index)

    def __tf_flatten__(self):
        return (), (self.key_values, self.index)

    @classmethod
    def __tf_unflatten__(cls, metadata, components):
        return cls(*components)


def _to_hf(x: tf.Tensor) -> tf.Tensor:
    return tf.transpose(x, [0, 2, 1, 3])  # B S N H <-> B N S H, HF's tuple layout


class DynamicLayerCache:
    """One layer's part of HF's tuple for one call: its past (k, v), each B N S H, or None for the first call."""

    def __init__(self, past):
        self.past = past

    def update(self, k: tf.Tensor, v: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Appends the new tokens' k, v (B T N H) to the past; returns the layer's whole k, v (B S N H)."""
        if self.past is None:
            return k, v
        past_k, past_v = (tf.cast(_to_hf(x), k.dtype) for x in self.past)  # B S N H
        return tf.concat([past_k, k], axis=1), tf.concat([past_v, v], axis=1)


class DynamicKVCache:
    """HF's tuple layout, per layer (k, v) each B N S H, grown by concatenation.

    Args:
        past_key_values: HF-style per-layer (k, v) from an earlier call, or None to start empty.
    """

    def __init__(self, past_key_values=None):
        self.key_values = tuple(past_key_values or ())

    @property
    def index(self):
        """Positions already cached (the S of the B N S H tuple): where the new tokens go."""
        return tf.shape(self.key_values[0][0])[2] if self.key_values else 0

    @property
    def past_length(self) -> int:
        """The same, on the host."""
        return int(self.key_values[0][0].shape[2]) if self.key_values else 0

    def layer(self, i: int) -> DynamicLayerCache:
        return DynamicLayerCache(self.key_values[i] if self.key_values else None)

    def advanced(self, key_values, length=None) -> tuple:
        """HF's tuple after a call: per layer its updated (k, v) (B S N H), each as B N S H."""
        return tuple((_to_hf(k), _to_hf(v)) for k, v in key_values)
