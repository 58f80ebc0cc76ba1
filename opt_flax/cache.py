"""The static KV cache of the Flax models: preallocated per-layer keys and values plus the write index.

Siblings: `opt_torch/cache.py` and `opt_tf/cache.py` hold the same cache in their frameworks; the checks against
the inputs and the sizes (`opt_core.cache.StaticCacheShape`) are shared.

`KVCache` is a pytree (a `flax.struct.dataclass`), so it goes in and out of `jax.jit` and `lax.while_loop`. It is
immutable, as everything in JAX: a forward writes each layer's new keys and values with `LayerCache.update` and
returns the next cache (`KVCache.advanced`), so compiled decode steps see static shapes; beam and contrastive
search continue other rows with `KVCache.reorder`.

Shapes: B batch, T new tokens, S cache length, N heads, H head dim, L layers.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from opt_core.cache import StaticCacheShape
from opt_core.config import OPTConfig


@flax.struct.dataclass
class LayerCache:
    """One layer's slots and the index the new tokens are written at (what its attention receives)."""

    k: jax.Array  # B S N H
    v: jax.Array  # B S N H
    index: jax.Array  # () int32

    def update(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes the new tokens' k, v (B T N H) at the index; returns the layer's whole k, v (B S N H)."""
        k = lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (0, self.index, 0, 0))
        v = lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (0, self.index, 0, 0))
        return k, v


@flax.struct.dataclass
class KVCache(StaticCacheShape):
    """The static cache: per layer (k, v), each B S N H with S the cache length, and the write index."""

    key_values: tuple  # L of (k, v), each B S N H
    index: jax.Array  # () int32: positions written so far

    @classmethod
    def create(cls, config: OPTConfig, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
        shape = (batch_size, max_length, config.num_attention_heads, config.head_dim)  # B S N H
        layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))
        return cls(layers, jnp.zeros((), jnp.int32))

    @property
    def past_length(self) -> int | None:
        """Positions written so far, or None inside a jit (where the index is symbolic)."""
        return None if isinstance(self.index, jax.core.Tracer) else int(self.index)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(*self.key_values[i], self.index)

    def advanced(self, key_values, length: int) -> KVCache:
        """The cache after a forward of `length` tokens wrote `key_values` (L of the layers' updated k, v)."""
        return KVCache(tuple(key_values), self.index + length)

    def reorder(self, rows: jax.Array) -> KVCache:
        """The cache with its rows (axis 0 of every k and v) gathered: beams and candidates continue other rows."""
        return self.replace(key_values=jax.tree.map(lambda x: x[rows], self.key_values))
