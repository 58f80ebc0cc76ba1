"""`LazyTensor`: a tensor known by its shape and dtype whose values are produced only when a writer asks for them.

Conversion keeps the model as a mapping of lazy tensors over memory-mapped sources (safetensors, `.bin`, metaseq
`.pt`), so a cast, a transpose or a model-parallel join happens one tensor at a time, while that tensor is written,
and peak memory follows the largest tensor rather than the model. Writers see an array-like: `shape`, `dtype`,
`size`, `ndim`, `nbytes`, `.T`, and `np.asarray(tensor)`.

Loading from memory-mapped files follows the same rule: `release_pages` drops a tensor's file pages from the
process once it has been checked or copied (the OS keeps them in its page cache), `row_blocks` and
`copy_released` walk a tensor a block at a time releasing each block behind them, so the file is never resident
whole beside its copy, and `file_range` tells a framework that can share the file's memory (torch) where a
tensor lies in it.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Callable, Iterator
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


BLOCK_BYTES = 1 << 24  # what `row_blocks` reads at a time: small beside any model, large enough to be fast


def row_blocks(array: np.ndarray, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, array[rows]) over the first axis, about `block_bytes` of `array` each; each block's pages of a
    memory-mapped file are released (`release_pages`) once the caller asks for the next one."""
    if array.ndim == 0 or array.size == 0:
        yield slice(None), array
        return
    rows = max(1, block_bytes // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], rows):
        block = array[start : start + rows]
        yield slice(start, start + rows), block
        release_pages(block)


def copy_released(array: np.ndarray, dtype: Any, transpose: bool = False) -> np.ndarray:
    """A new C-contiguous copy of `array` in `dtype` (a 2-D one transposed when asked), copied a block of rows
    at a time with each block's file pages released behind it: copying a memory-mapped tensor holds its copy and
    one block of the file, never the whole tensor twice. The copy is 64-byte aligned, so a framework may adopt
    its memory rather than copy it again (XLA's CPU client does)."""
    out = _aligned_empty(array.shape[::-1] if transpose else array.shape, np.dtype(dtype))
    for rows, block in row_blocks(array):
        if transpose:
            out[:, rows] = block.T
        else:
            out[rows] = block
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class FileRange:
    """Where an array's bytes lie in a file: `nbytes` bytes from byte `offset` of `path`."""

    path: str
    offset: int
    nbytes: int


def _mapping_of(array: np.ndarray) -> tuple[np.memmap | None, mmap.mmap | None]:
    """The `np.memmap` that made the mapping (if any) and the `mmap` object an array's memory comes from, through
    the array's bases."""
    memmap, owner = None, array
    while owner is not None and not isinstance(owner, mmap.mmap):
        if isinstance(owner, np.memmap):
            memmap = owner
        owner = getattr(owner, "base", None)
    return memmap, owner


def _read_only_mapping(array: Any) -> tuple[np.memmap | None, mmap.mmap, int] | None:
    """(memmap, mapping, the array's byte offset in the mapping) when `array` lies in a read-only file mapping."""
    if not isinstance(array, np.ndarray) or array.size == 0:
        return None
    memmap, mapping = _mapping_of(array)
    if mapping is None:
        return None
    start = np.frombuffer(mapping, np.uint8)  # a view: its address is the mapping's, its flag the access
    if start.flags.writeable:  # dropping a written page of a private or shared-writable mapping would lose data
        return None
    return memmap, mapping, array.__array_interface__["data"][0] - start.__array_interface__["data"][0]


def file_range(array: Any) -> FileRange | None:
    """Where a C-contiguous array that is a view of a read-only `np.memmap` lies in its file; None for any other
    array, so a caller can share the file's memory when it may and copy otherwise."""
    found = _read_only_mapping(array)
    if found is None or found[0] is None or not array.flags.c_contiguous:
        return None
    memmap, _, offset = found
    mapped_from = memmap.offset - memmap.offset % mmap.ALLOCATIONGRANULARITY  # np.memmap maps from a boundary
    return FileRange(str(memmap.filename), mapped_from + offset, int(array.nbytes))


def release_pages(array: Any) -> None:
    """Drops the pages of a read-only memory-mapped file under `array` from this process's resident memory.

    Called once a tensor has been checked or copied: the pages stay in the OS page cache (read again, from there,
    if the array is used later), but no longer count against the process, so loading holds one tensor of the file
    at a time rather than the whole file beside its copy. Pages at the ends of the range that the neighbouring
    tensors share go too; they are read again when needed. Arrays not backed by a read-only mapping (a copy, a
    copy-on-write mapping that may hold writes) and platforms without `madvise` are left alone.
    """
    found = _read_only_mapping(array)
    if found is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    _, mapping, offset = found
    page = mmap.PAGESIZE
    begin = offset // page * page
    end = min(len(mapping), -(-(offset + array.nbytes) // page) * page)
    mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)
