"""The PyTorch key/value caches: objects that own their update, as HF's `Cache.update`.

Siblings: `opt_tf/cache.py`, `opt_flax/cache.py`. Both caches here answer `update(layer_idx, k, v, cache_position)`
with all of the layer's keys and values so far; attention receives one layer's view (`cache.layer(i, slots)`) as
its `past_key_value` and calls `past_key_value.update(k, v)`, whatever kind of cache is behind it.

* `StaticKVCache` preallocates per layer B N S H (S = max length) for compiled decoding: the new keys and values
  are written in place at `cache_position`, so every decode step sees the same shapes.
* `DynamicKVCache` grows HF's tuple layout, per layer (k, v) each B N S H, by concatenation: a forward wraps the
  tuple `past_key_values` users step with by hand in it, and returns the grown tuple.

Shapes: B batch, N heads, T new tokens, S cache length, H head dim.
"""

from __future__ import annotations

import torch

from opt_core.config import OPTConfig
from opt_core.inputs import check_cache_position, check_static_cache


class LayerCache:
    """One layer's part of a cache for one forward: what attention receives as `past_key_value`.

    Args:
        cache: a StaticKVCache or DynamicKVCache.
        layer_idx: the layer.
        cache_position: T slots the new tokens go to.
    """

    def __init__(self, cache, layer_idx: int, cache_position: torch.Tensor):
        self.cache = cache
        self.layer_idx = layer_idx
        self.cache_position = cache_position

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B N T H new keys and values -> B N S H all of this layer's."""
        return self.cache.update(self.layer_idx, k, v, self.cache_position)


class StaticLayerCache:
    """One layer's buffers of a `StaticKVCache` and the slots the new tokens go to: tensors only, so a compiled
    layer region (`opt_torch.modeling`) takes them as its inputs.

    Args:
        keys, values: the layer's B N S H buffers, written in place.
        cache_position: T slots the new tokens go to.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor):
        self.keys, self.values, self.cache_position = keys, values, cache_position

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B N T H new keys and values -> B N S H all of this layer's."""
        k_all = self.keys.index_copy_(2, self.cache_position, k)  # B N S H
        v_all = self.values.index_copy_(2, self.cache_position, v)  # B N S H
        return k_all, v_all


class StaticKVCache:
    """Preallocated keys and values for compiled decoding: per layer B N S H, S = max_length.

    The caller passes `cache_position` (the slots the new tokens are written to) and an attention mask over all
    S slots (0 for slots not written yet), so every decode step sees the same shapes.

    Args:
        config: the model's OPTConfig.
        batch_size: B.
        max_length: S, prompt plus new tokens.
        dtype, device: of the buffers (the model's); `device` may be a list, one device per layer (a model placed
            over several devices by a device_map).
    """

    def __init__(self, config: OPTConfig, batch_size: int, max_length: int, dtype=torch.float32, device=None):
        shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)  # B N S H
        layers = config.num_hidden_layers
        devices = device if isinstance(device, (list, tuple)) else [device] * layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=devices[i]) for i in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=devices[i]) for i in range(layers)]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def layer(self, layer_idx: int, cache_position: torch.Tensor) -> StaticLayerCache:
        return StaticLayerCache(self.keys[layer_idx], self.values[layer_idx], cache_position)

    def update(self, layer_idx: int, k, v, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes B N T H `k`, `v` at the T slots `cache_position` of layer `layer_idx`; returns its B N S H."""
        return self.layer(layer_idx, cache_position).update(k, v)

    def check(self, cache_position: torch.Tensor, batch_and_length: tuple[int, int], mask_shape) -> None:
        """Clear errors for new tokens that do not fit: batch, room left, and a mask over all S slots."""
        check_cache_position(cache_position.detach().cpu().numpy(), batch_and_length[1])
        past_length = int(cache_position[0]) if cache_position.numel() else 0
        check_static_cache(self.batch_size, self.max_length, past_length, batch_and_length, mask_shape)

    def reorder(self, beam_index: torch.Tensor) -> None:
        """Keeps the rows `beam_index` (beam search), in place."""
        for cache in (self.keys, self.values):
            for i, buffer in enumerate(cache):
                cache[i] = buffer.index_select(0, beam_index)


class DynamicKVCache:
    """HF's tuple layout, per layer (k, v) each B N S H, grown by concatenation as a forward runs.

    Args:
        past_key_values: HF-style per-layer (k, v) from an earlier forward, or None to start empty.
    """

    def __init__(self, past_key_values=None):
        self.key_values = [tuple(layer) for layer in past_key_values or ()]

    @property
    def past_length(self) -> int:
        return self.key_values[0][0].shape[2] if self.key_values else 0

    def layer(self, layer_idx: int, cache_position: torch.Tensor) -> LayerCache:
        return LayerCache(self, layer_idx, cache_position)

    def update(self, layer_idx: int, k, v, cache_position=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends B N T H `k`, `v` to layer `layer_idx` (the first call for a layer starts it); returns B N S H."""
        if layer_idx < len(self.key_values):
            past_k, past_v = self.key_values[layer_idx]
            k = torch.cat([past_k, k], dim=2)  # B N S H
            v = torch.cat([past_v, v], dim=2)  # B N S H
            self.key_values[layer_idx] = (k, v)
        else:
            self.key_values.append((k, v))
        return k, v

    def to_legacy(self) -> tuple:
        """The HF-style tuple: per layer (k, v)."""
        return tuple(self.key_values)
