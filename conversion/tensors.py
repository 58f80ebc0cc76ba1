"""Lazy tensors: see `opt_core.lazy` (re-exported here)."""

from opt_core.lazy import LazyTensor, same_bits

__all__ = ["LazyTensor", "same_bits"]
