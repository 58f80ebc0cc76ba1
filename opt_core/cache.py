"""What the TF and Flax static caches share, framework-free: their sizes, read from the B S N H buffers, and the
checks of new tokens against them (`opt_core.inputs.check_static_cache`).

Siblings: `opt_tf/cache.py` and `opt_flax/cache.py` subclass `StaticCacheShape` with their own buffers, update and
index; `opt_torch/cache.py` keeps HF's B N S H layout and sizes itself.
"""

from __future__ import annotations

from opt_core.inputs import check_static_cache


class StaticCacheShape:
    """Sizes and input checks of a cache holding `key_values`: per layer (k, v), each B S N H.

    Subclasses provide `key_values` and `past_length` (positions written so far, or None where the write index is
    symbolic, inside a compiled program).
    """

    key_values: tuple
    past_length: int | None

    @property
    def batch_size(self) -> int:
        return self.key_values[0][0].shape[0]

    @property
    def max_length(self) -> int:
        return self.key_values[0][0].shape[1]

    def check(self, batch_and_length: tuple[int, int], mask_shape) -> None:
        """Raises InputError unless T new tokens of a batch of B (and a B S mask) fit; shapes are checked always,
        the room left only where the index is concrete."""
        check_static_cache(self.batch_size, self.max_length, self.past_length, batch_and_length, mask_shape)
