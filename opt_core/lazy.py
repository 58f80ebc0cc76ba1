"""`LazyTensor`: a tensor known by its shape and dtype whose values are produced only when a writer asks for them.

Conversion keeps the model as a mapping of lazy tensors over memory-mapped sources (safetensors, `.bin`, metaseq
`.pt`), so a cast, a transpose or a model-parallel join happens one tensor at a time, while that tensor is written,
and peak memory follows the largest tensor rather than the model. Writers see an array-like: `shape`, `dtype`,
`size`, `ndim`, `nbytes`, `.T`, and `np.asarray(tensor)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from opt_core.errors import CheckpointError


class LazyTensor:
    """A tensor whose values come from `load()` on demand; nothing is kept after the caller drops the array.

    Args:
        shape: the tensor's shape.
        dtype: the dtype `load()` returns.
        load: produces the values; called once per use (a writer and the verification each call it).
        name: what to call the tensor in errors.
    """

    __slots__ = ("shape", "dtype", "name", "_load")

    def __init__(self, shape: tuple[int, ...], dtype: Any, load: Callable[[], np.ndarray], name: str = "tensor"):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.name = name
        self._load = load

    @classmethod
    def wrap(cls, array: Any, name: str = "tensor") -> LazyTensor:
        """A lazy view of an existing array (e.g. a memory-mapped one); LazyTensors pass through."""
        if isinstance(array, LazyTensor):
            return array
        return cls(array.shape, array.dtype, lambda: array, name)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        """The values, checked against the promised shape and dtype (a source that changed under us is caught)."""
        array = np.asarray(self._load())
        if array.shape != self.shape or array.dtype != self.dtype:
            raise CheckpointError(
                f"{self.name}: expected {self.dtype}{list(self.shape)}, got {array.dtype}{list(array.shape)}"
            )
        return array

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.load()
        if dtype is not None and np.dtype(dtype) != array.dtype:
            return array.astype(dtype)
        return array.copy() if copy else array

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name: `weights.to_style_layout` transposes with `.T`)
        return LazyTensor(self.shape[::-1], self.dtype, lambda: self.load().T, self.name)

    def astype(self, dtype: Any) -> LazyTensor:
        """The tensor cast to `dtype` when loaded (itself if the dtype is already right)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return LazyTensor(self.shape, dtype, lambda: self.load().astype(dtype), self.name)

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, {self.dtype}{list(self.shape)})"


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality of shape, dtype and bytes (so NaNs and -0.0 compare as stored)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a_bytes = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    b_bytes = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return bool(np.array_equal(a_bytes, b_bytes))
