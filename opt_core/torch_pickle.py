"""Reads and writes PyTorch checkpoint files without importing torch or running pickled code.

`torch.save` writes a zip archive (`<prefix>/data.pkl` plus one uncompressed `<prefix>/data/<key>`
entry per storage) or, before PyTorch 1.6, the "legacy" stream (magic, protocol and sys-info
pickles, the object pickle, the storage key list, then the raw storages). Both hold a pickle whose
tensors are calls to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` on
storages named by persistent ids.

This module reads those pickles with an unpickler that imports nothing: every global the pickle
names is looked up in the small tables below and, if absent, either refused (always in
`load_state_dict`; in `load_objects` for anything whose call could have effects) or replaced by an
inert `PickledObject` placeholder. Storages are memory-mapped, so reading a large checkpoint costs
memory of about its largest non-contiguous tensor.

In `load_objects` results torch dtypes read as strings such as "torch.float16", devices as strings
such as "cuda:0", `torch.Size` as a tuple; numpy arrays and scalars in the pickle are rebuilt.

`opt_core.formats` uses this for `pytorch_model.bin` and `conversion` for metaseq `*.pt` files;
the framework packages never call it. The writer mirrors `torch.save`'s zip layout so that
`torch.load(weights_only=True, mmap=True)` and HF transformers read its files.
"""

from __future__ import annotations

import builtins
import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any, NamedTuple

import ml_dtypes
import numpy as np

from opt_core.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["PickledObject", "load_objects", "load_state_dict", "save_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_ALIGN = 64  # torch.save starts each zip entry's data on 64 bytes, so storages map in place
_CHUNK = 1 << 26  # bytes per write when streaming a tensor into the archive

# Storage classes torch pickles (torch.storage._dtype_to_storage_type_map); UntypedStorage is bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}
# torch dtypes by their pickled name (`torch.<name>`); dtypes newer than the storage classes
# (uint16, float8) are saved as an UntypedStorage plus `_rebuild_tensor_v3(..., dtype)`.
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
# Dtypes without a numpy counterpart still read as names inside `load_objects` (e.g. an amp config).
_OTHER_TORCH_DTYPES = {"complex32", "qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
# What the writer emits: the dtypes OPT checkpoints use, each with its legacy storage class.
_WRITE_STORAGES = {
    dtype: name
    for name, dtype in _STORAGE_DTYPES.items()
    if name not in ("UntypedStorage", "ComplexFloatStorage", "ComplexDoubleStorage")
}

# Globals whose call could act on the machine. `load_objects` would never call one (unknown globals
# become inert placeholders) but refuses the file anyway, because no honest checkpoint names them.
# Harmless classes from these areas that honest files do carry (pathlib paths, SimpleNamespace,
# functools.partial) are not listed: they read as placeholders.
_DENIED_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "shutil", "importlib",
    "pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "socket", "ctypes", "cffi",
    "runpy", "code", "codeop", "pty", "pdb", "bdb", "multiprocessing", "concurrent", "threading",
    "_thread", "signal", "asyncio", "webbrowser", "tempfile", "io", "_io", "glob", "fileinput",
    "zipimport", "urllib", "http", "ftplib", "smtplib", "requests", "operator", "inspect", "gc",
    "weakref", "timeit", "platform", "sysconfig", "site", "trace", "venv", "distutils",
    "setuptools", "pip", "_posixsubprocess", "_winapi", "msvcrt", "winreg", "resource", "fcntl",
    "mmap", "torch.hub", "torch.jit", "torch.serialization", "torch.utils.cpp_extension",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.lib.npyio",
}  # fmt: skip
_DENIED_NAMES = {
    ("torch", "load"), ("torch", "save"), ("torch", "from_file"), ("numpy", "load"),
    ("numpy", "save"), ("numpy", "savez"), ("numpy", "savetxt"), ("numpy", "loadtxt"),
    ("numpy", "fromfile"), ("numpy", "memmap"),
}  # fmt: skip
_DENIED_BUILTINS = {
    "eval", "exec", "execfile", "compile", "open", "file", "__import__", "reload", "getattr",
    "setattr", "delattr", "hasattr", "globals", "locals", "vars", "input", "raw_input", "print",
    "breakpoint", "help", "exit", "quit", "__build_class__", "apply",
}  # fmt: skip
# Builtins read as the real thing; calling them cannot have effects. bytes and bytearray are wrapped
# below (bytes(10**12) would allocate), and range is left out (list(range(10**12)) would too).
_SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "set", "frozenset", "list", "dict", "tuple", "str", "int", "float", "complex", "bool",
        "slice", "object",
    )
}  # fmt: skip
# Python 2 and old torch module names that pickles still carry.
_MODULE_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "torch.tensor": "torch._tensor",
}


class _Corrupt(Exception):
    """Internal: the file is malformed; `_load` turns it into a CheckpointError naming the file."""


# --- placeholders ---------------------------------------------------------------------------------


class PickledObject:
    """Inert stand-in for an instance of a class that `load_objects` did not import.

    Nothing of the class is imported, constructed or called: the placeholder only records what
    the pickle asked for, so a metaseq `argparse.Namespace` reads as
    ``PickledObject("argparse", "Namespace", args=(), state={"arch": ..., ...})``.

    Args:
        module: the module the pickle names, e.g. ``"argparse"``.
        name: the class (or function) name inside it, e.g. ``"Namespace"``.
        args: positional arguments the pickle passed to the constructor (or to ``__new__``).
        state: what the pickle passed to ``__setstate__``; for plain classes the instance
            ``__dict__``.
        kwargs: keyword arguments passed to ``__new__`` (pickle protocol 4), usually empty.

    Also recorded: ``items``, the (key, value) pairs a dict subclass received, and
    ``list_items``, the values a list or set subclass received.
    """

    def __init__(
        self,
        module: str,
        name: str,
        args: tuple = (),
        state: Any = None,
        kwargs: dict | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.args = args
        self.state = state
        self.kwargs = kwargs or {}
        self.items: list[tuple[Any, Any]] = []
        self.list_items: list[Any] = []

    # The unpickler calls these (BUILD, SETITEMS, APPENDS, ADDITEMS); each only records.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    def add(self, value: Any) -> None:
        self.list_items.append(value)

    def __repr__(self) -> str:
        fields = f"{self.module!r}, {self.name!r}, args={self.args!r}, state={self.state!r}"
        return f"PickledObject({fields})"


class _StubMeta(type):
    """Metaclass of placeholder classes, frozen so that a pickle's BUILD cannot rebind `__new__`."""

    def __setattr__(cls, key: str, value: Any) -> None:
        raise _Corrupt(f"the pickle sets attribute {key!r} on class {cls.module}.{cls.name}")

    def __repr__(cls) -> str:
        return f"<unimported class {cls.module}.{cls.name}>"


def _stub_class(module: str, name: str) -> type:
    """A class the unpickler may call or `__new__` (NEWOBJ needs a type); both make placeholders."""

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls cls.__new__(cls, *args)
        return PickledObject(module, name, args, None, kwargs)

    return _StubMeta("PickledClass", (), {"__new__": __new__, "module": module, "name": name})


class _SafeFunction:
    """A callable handed to the unpickler; frozen so that BUILD on it cannot change later loads."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _Corrupt(f"the pickle sets attribute {key!r} on {self._fn.__name__}")


class _StorageType(NamedTuple):
    """What `torch.FloatStorage` and friends read as: only the element dtype matters here."""

    name: str
    dtype: np.dtype


class _TensorClass(NamedTuple):
    """`torch.Tensor` or `torch.nn.Parameter`, the `new_type` argument of _rebuild_from_type_v2."""

    name: str


class _Storage(NamedTuple):
    raw: np.ndarray | None  # the storage's bytes (uint8); None while a legacy pickle is scanned
    dtype: np.dtype
    swap: bool  # the file's byte order differs from this machine's


# --- tensors --------------------------------------------------------------------------------------


def _tensor(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray | None:
    """The array `torch._utils._rebuild_tensor` builds; a view of the mapped storage if possible."""
    if not isinstance(storage, _Storage):
        raise _Corrupt(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if storage.raw is None:
        return None  # legacy format, first pass: storage bytes are located after the pickle
    dtype = storage.dtype
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    offset = _ints((offset,), "storage offset")[0]
    if len(size) != len(stride):
        raise _Corrupt(f"tensor size {size} and stride {stride} differ in length")
    typed = storage.raw[: storage.raw.size // dtype.itemsize * dtype.itemsize].view(dtype)
    if math.prod(size) == 0:
        return np.zeros(size, dtype)
    # Bounds are checked before as_strided, which would otherwise read memory outside the file.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= typed.size:
        raise _Corrupt(
            f"a tensor of size {size}, stride {stride} at offset {offset} reaches past "
            f"the end of its storage ({typed.size} elements)"
        )
    strides = tuple(s * dtype.itemsize for s in stride)
    array = np.lib.stride_tricks.as_strided(typed[offset:], size, strides, writeable=False)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return _byteswapped(array) if storage.swap else array


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise _Corrupt(f"tensor {what} {values!r} is not a tuple of non-negative integers")
    return values


def _byteswapped(array: np.ndarray) -> np.ndarray:
    if array.dtype.itemsize == 1:
        return array
    if array.dtype.kind == "V":  # ml_dtypes (bfloat16): swap as same-size unsigned integers
        unsigned = np.dtype(f"u{array.dtype.itemsize}")
        return array.view(unsigned).byteswap().view(array.dtype)
    return array.byteswap()


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    if metadata and any(metadata.values()):
        # conj/neg bits of lazily conjugated or negated views; real tensors never carry them.
        raise _Corrupt(f"tensor metadata {metadata!r} (conjugate/negative views) is not supported")
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, meta=None):
    # load_state_dict resolves `torch.<dtype>` to a numpy dtype, load_objects to "torch.<dtype>".
    if isinstance(dtype, str) and dtype.startswith("torch."):
        dtype = _TORCH_DTYPES.get(dtype[len("torch.") :], dtype)
    # Only the table's dtypes: a pickled numpy object dtype would turn file bytes into pointers.
    if not isinstance(dtype, np.dtype) or dtype not in _TORCH_DTYPES.values():
        raise _Corrupt(f"tensor dtype {dtype!r} is not supported")
    if isinstance(storage, _Storage):  # an UntypedStorage: its bytes are viewed as `dtype`
        storage = storage._replace(dtype=dtype)
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, meta)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data  # a Parameter is its tensor here; requires_grad and hooks have no numpy meaning


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)  # tensor subclasses (Parameter) collapse to their data


# --- globals --------------------------------------------------------------------------------------


_TENSOR_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _SafeFunction(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _SafeFunction(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _SafeFunction(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _SafeFunction(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _SafeFunction(_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _SafeFunction(_rebuild_from_type_v2),
    ("torch", "Tensor"): _TensorClass("Tensor"),
    ("torch._tensor", "Tensor"): _TensorClass("Tensor"),
    ("torch.nn", "Parameter"): _TensorClass("Parameter"),
    ("torch.nn.parameter", "Parameter"): _TensorClass("Parameter"),
}


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1"); nothing else is worth decoding.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Corrupt(f"_codecs.encode called with {type(text).__name__} and {encoding!r}")
    return text.encode("latin-1")


def _bytes_from(kind: type) -> Callable:
    def build(source: Any = b"", encoding: Any = None) -> bytes | bytearray:
        # Protocol 2 writes bytearray(str, "latin-1"); an integer source would only allocate.
        if isinstance(source, str) and encoding in ("latin1", "latin-1"):
            return kind(source, "latin-1")
        if isinstance(source, (bytes, bytearray, list)) and encoding is None:
            return kind(source)
        raise _Corrupt(f"{kind.__name__}({type(source).__name__}, {encoding!r}) is not supported")

    return build


def _reconstructor(cls: Any, base: Any, state: Any = None) -> PickledObject:
    # Protocol 0/1 spelling of "make an instance of cls"; only placeholder classes are instantiated.
    if not isinstance(cls, _StubMeta):
        raise _Corrupt(f"copyreg._reconstructor called on {cls!r}")
    return cls() if state is None else cls(state)


def _device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise _Corrupt(f"torch.device({kind!r}, {index!r}) is malformed")
    return kind if index is None else f"{kind}:{index}"


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles arrays as _reconstruct(ndarray, (0,), b"b") followed by ndarray.__setstate__.
    if subtype is not np.ndarray:
        raise _Corrupt(f"numpy array subclass {subtype!r} is not supported")
    return np.ndarray((0,), np.dtype(dtype))  # the pickled shape would only allocate; state sets it


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise _Corrupt(f"numpy scalar of dtype {dtype!r}")
    if dtype.hasobject:
        return data
    return np.frombuffer(data, dtype, count=1)[0]


_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x and 2.x
_OBJECT_GLOBALS: dict[tuple[str, str], Any] = {
    **{("builtins", name): value for name, value in _SAFE_BUILTINS.items()},
    ("builtins", "bytes"): _SafeFunction(_bytes_from(bytes)),
    ("builtins", "bytearray"): _SafeFunction(_bytes_from(bytearray)),
    ("_codecs", "encode"): _SafeFunction(_latin1_encode),
    ("copyreg", "_reconstructor"): _SafeFunction(_reconstructor),
    ("torch", "device"): _SafeFunction(_device),
    ("torch", "Size"): tuple,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, "_reconstruct"): _SafeFunction(_np_reconstruct) for m in _NUMPY_MULTIARRAY},
    **{(m, "scalar"): _SafeFunction(_np_scalar) for m in _NUMPY_MULTIARRAY},
}


def _tensor_global(module: str, name: str) -> Any:
    """Globals a state dict may use, or None."""
    # torch.load maps any `*Storage` name to its dtype; old files name torch.cuda.HalfStorage etc.
    if (module == "torch" or module.startswith("torch.")) and name.endswith("Storage"):
        if name not in _STORAGE_DTYPES:
            raise _Corrupt(f"storage type {module}.{name} is not supported")
        return _StorageType(name, _STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    return _TENSOR_GLOBALS.get((module, name))


def _object_global(module: str, name: str) -> Any:
    """Globals `load_objects` reads as real values, or None."""
    found = _tensor_global(module, name)
    if found is not None:
        if isinstance(found, np.dtype) and module == "torch":
            return f"torch.{name}"
        return found
    if module == "torch" and name in _OTHER_TORCH_DTYPES:
        return f"torch.{name}"
    return _OBJECT_GLOBALS.get((module, name))


def _denied(module: str, name: str) -> bool:
    if module == "builtins":
        return name in _DENIED_BUILTINS
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(prefixes & _DENIED_MODULES) or (module, name) in _DENIED_NAMES


# --- unpickling -----------------------------------------------------------------------------------


class _Context:
    """An unpickling policy: which globals resolve, what persistent ids mean, what file to blame."""

    def __init__(self, path: str, strict: bool, storage: Callable[[Any], Any]) -> None:
        self.path = path
        self.strict = strict
        self.storage = storage
        self._stubs: dict[tuple[str, str], type] = {}

    def resolve(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Corrupt(f"the pickle names a global {module!r}.{name!r}")
        module = _MODULE_ALIASES.get(module, module)
        found = _tensor_global(module, name) if self.strict else _object_global(module, name)
        if found is not None:
            return found
        if self.strict:
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load: the pickle imports {module}.{name}, which is not "
                "tensor data (a state dict may only use torch storages, OrderedDict and "
                "torch._utils rebuild functions)"
            )
        if _denied(module, name):
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load: the pickle imports {module}.{name}, which "
                "could run code or act on the system if called"
            )
        return self._stubs.setdefault((module, name), _stub_class(module, name))

    def unpickle(self, file: IO[bytes]) -> Any:
        start = file.tell()
        _check_pickle(file)
        file.seek(start)
        return _Unpickler(file, self).load()


# A state dict's pickle holds at most ~2000 items on the unpickler's stack (SETITEMS batches of 1000 pairs) and a
# few marks; far more means nesting built to exhaust the stack of whatever walks the result.
_MAX_PICKLE_STACK = 10_000
_MAX_PICKLE_MARKS = 100


def _check_pickle(file: IO[bytes]) -> None:
    """Walks one pickle's opcodes without building anything, refusing what would make the unpickler allocate far
    beyond the file or build a structure nested deep enough to overflow a recursive walk: a string or int that
    claims more bytes than the file has left (the C unpickler allocates the claimed size before reading), a memo
    index past the opcodes that could have filled it (it grows the memo to the index), and a stack deeper than
    `_MAX_PICKLE_STACK` items or `_MAX_PICKLE_MARKS` marks. Leaves `file` anywhere; callers seek back.
    """
    start = file.tell()
    size = file.seek(0, io.SEEK_END)
    file.seek(start)
    stack, marks, count = 0, [], 0
    try:
        for opcode, arg, _ in pickletools.genops(_BoundedReader(file, size)):
            count += 1
            before, after = opcode.stack_before, opcode.stack_after
            if pickletools.markobject in before:  # pops back to the last mark, and what lies below it
                if not marks:
                    raise _Corrupt(f"the pickle's {opcode.name} has no mark to pop to")
                stack = marks.pop() - (len(before) - 2) + len(after)
            elif opcode.name == "MARK":
                marks.append(stack)
            else:
                stack += len(after) - len(before)
            if stack > _MAX_PICKLE_STACK or len(marks) > _MAX_PICKLE_MARKS:
                raise _Corrupt("the pickle nests deeper than any checkpoint does (built to exhaust the stack?)")
            if opcode.name.endswith(("PUT", "GET")) and arg is not None and arg > count:
                raise _Corrupt(f"the pickle's memo index {arg} is out of range")
    except ValueError as error:  # genops: an unknown opcode, a malformed argument, the pickle ending early
        raise _Corrupt(f"corrupt pickle ({error})") from None


class _BoundedReader:
    """A file for `pickletools.genops` whose reads may not claim more bytes than the file has left."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file, self.size = file, size

    def read(self, n: int = -1) -> bytes:
        if n > self.size - self.file.tell():
            raise _Corrupt(f"the pickle claims a {n}-byte value, longer than what follows it in the file")
        return self.file.read(n)

    def readline(self) -> bytes:
        return self.file.readline(max(self.size - self.file.tell(), 0))

    def tell(self) -> int:
        return self.file.tell()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], context: _Context) -> None:
        super().__init__(file, encoding="utf-8")  # torch.load's default for Python 2 strings
        self._context = context

    def find_class(self, module: str, name: str) -> Any:
        return self._context.resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._context.storage(pid)


def _no_storages(pid: Any) -> Any:
    raise _Corrupt(f"unexpected persistent id {pid!r} outside the object pickle")


def _storage_id(pid: Any, length: int) -> tuple[_StorageType, str, int, Any]:
    """Checks a ('storage', type, key, location, numel[, view]) id; returns its useful parts."""
    if not isinstance(pid, tuple) or len(pid) != length or pid[0] not in ("storage", b"storage"):
        raise _Corrupt(f"unexpected persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if not isinstance(storage_type, _StorageType):
        raise _Corrupt(f"persistent id {pid!r} does not name a torch storage type")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise _Corrupt(f"persistent id {pid!r} is malformed")
    return storage_type, key, numel, pid[5] if length == 6 else None


# --- zip format -----------------------------------------------------------------------------------


class _ZipStorages:
    """Maps `<prefix>/data/<key>` entries of an open archive to storages, once per key."""

    def __init__(self, archive: zipfile.ZipFile, mapped: mmap.mmap, prefix: str, swap: bool) -> None:
        self.archive, self.mapped, self.prefix, self.swap = archive, mapped, prefix, swap
        self.raw: dict[str, np.ndarray] = {}

    def load(self, pid: Any) -> _Storage:
        storage_type, key, numel, _ = _storage_id(pid, 5)
        if key not in self.raw:
            self.raw[key] = self._entry_bytes(key)
        raw = self.raw[key]
        if raw.size < numel * storage_type.dtype.itemsize:
            raise _Corrupt(
                f"storage data/{key} holds {raw.size} bytes, but the pickle expects {numel} "
                f"elements of {storage_type.dtype}"
            )
        return _Storage(raw, storage_type.dtype, self.swap)

    def _entry_bytes(self, key: str) -> np.ndarray:
        try:
            info = self.archive.getinfo(f"{self.prefix}data/{key}")
        except KeyError:
            raise _Corrupt(f"the archive has no entry {self.prefix}data/{key}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            # torch never compresses; a re-zipped archive still reads, just not memory-mapped.
            return np.frombuffer(_read_entry(self.archive, info, len(self.mapped)), np.uint8)
        header = self.mapped[info.header_offset : info.header_offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise _Corrupt(f"the zip header of data/{key} is damaged")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if start + info.file_size > len(self.mapped):
            raise _Corrupt(f"data/{key} runs past the end of the file (truncated?)")
        return np.frombuffer(self.mapped, np.uint8, info.file_size, start)


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> bytes:
    """An entry's bytes, refused before reading when it claims more bytes than the archive holds (zipfile allocates
    the claimed size first) or to expand past twice the archive's size: real weights barely compress, and a zip
    bomb must not allocate gigabytes before anything is refused."""
    if info.compress_size > archive_size:
        raise _Corrupt(f"{info.filename} claims {info.compress_size} bytes, more than the {archive_size}-byte file")
    if info.file_size > 2 * archive_size:
        raise _Corrupt(
            f"{info.filename} would expand to {info.file_size} bytes from a {archive_size}-byte file (a zip bomb?)"
        )
    return archive.read(info)  # zipfile stops at the declared size and checks the CRC


def _zip_prefix(archive: zipfile.ZipFile) -> str:
    """The archive's top folder holding data.pkl: `archive/`, or the file's stem (older torch)."""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        found = "no" if not pickles else f"{len(pickles)}"
        raise _Corrupt(f"a zip archive with {found} <folder>/data.pkl, not a torch.save checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}constants.pkl" in archive.namelist():
        raise _Corrupt("a TorchScript archive (torch.jit.save), not a torch.save checkpoint")
    return prefix


def _zip_byteorder(archive: zipfile.ZipFile, prefix: str, archive_size: int) -> str:
    try:
        info = archive.getinfo(f"{prefix}byteorder")
    except KeyError:
        # Files from before the record existed came from little-endian machines; torch assumes so.
        return "little"
    order = _read_entry(archive, info, archive_size)
    if order not in (b"little", b"big"):
        raise _Corrupt(f"unknown byte order {order!r}")
    return order.decode()


def _read_zip(file: IO[bytes], mapped: mmap.mmap, path: str, strict: bool) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as error:
        raise _Corrupt(f"truncated or corrupt zip archive ({error})") from None
    with archive:
        prefix = _zip_prefix(archive)
        swap = _zip_byteorder(archive, prefix, len(mapped)) != sys.byteorder
        storages = _ZipStorages(archive, mapped, prefix, swap)
        data = _read_entry(archive, archive.getinfo(f"{prefix}data.pkl"), len(mapped))
        return _Context(path, strict, storages.load).unpickle(io.BytesIO(data))


# --- legacy format --------------------------------------------------------------------------------


class _LegacyStorages:
    """Storages of the pre-1.6 stream; their bytes follow the pickle, found after a first pass."""

    def __init__(self) -> None:
        self.dtypes: dict[str, tuple[np.dtype, int]] = {}
        self.raw: dict[str, np.ndarray] = {}
        # Legacy storages are always written little-endian (THPStorage_writeFileRaw).
        self.swap = sys.byteorder == "big"

    def record(self, pid: Any) -> _Storage:
        if isinstance(pid, tuple) and pid[:1] in (("module",), (b"module",)) and len(pid) == 4:
            return pid[1]  # an nn.Module class saved with its source: its placeholder class
        storage_type, key, numel, _ = _storage_id(pid, 6)
        self.dtypes.setdefault(key, (storage_type.dtype, numel))
        return _Storage(None, storage_type.dtype, self.swap)

    def locate(self, keys: Any, mapped: mmap.mmap, position: int) -> None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _Corrupt("the storage key list is malformed")
        for key in keys:
            if key not in self.dtypes:
                raise _Corrupt(f"storage {key} is listed but no tensor uses it")
            dtype, numel = self.dtypes[key]
            if position + 8 > len(mapped):
                raise _Corrupt(f"the file ends before storage {key} (truncated?)")
            count = int.from_bytes(mapped[position : position + 8], "little")
            end = position + 8 + count * dtype.itemsize
            if count != numel:
                raise _Corrupt(f"storage {key} should hold {numel} elements, the file says {count}")
            if end > len(mapped):
                raise _Corrupt(f"the file ends inside storage {key} (truncated?)")
            self.raw[key] = np.frombuffer(mapped, np.uint8, end - position - 8, position + 8)
            position = end

    def load(self, pid: Any) -> _Storage:
        if isinstance(pid, tuple) and pid[:1] in (("module",), (b"module",)) and len(pid) == 4:
            return pid[1]
        storage_type, key, numel, view = _storage_id(pid, 6)
        if key not in self.raw:
            raise _Corrupt(f"storage {key} has no data in the file")
        raw, itemsize = self.raw[key], storage_type.dtype.itemsize
        if view is not None:  # (view_key, offset, size) in elements: a slice of the root storage
            _, offset, size = view
            raw = raw[offset * itemsize : (offset + size) * itemsize]
        return _Storage(raw, storage_type.dtype, self.swap)


def _read_legacy(file: IO[bytes], mapped: mmap.mmap, path: str, strict: bool) -> Any:
    header = _Context(path, strict, _no_storages)
    try:
        magic = header.unpickle(file)
    except CheckpointError:
        raise  # an unsafe global: say so, even if this is not a checkpoint
    except Exception:
        magic = None  # not a pickle at all
    if magic != _LEGACY_MAGIC:
        raise _Corrupt(
            "not a PyTorch checkpoint: neither a zip archive nor a pickle starting with "
            f"torch.save's magic number (the file starts with {mapped[:8]!r})"
        )
    version = header.unpickle(file)
    if version != _LEGACY_PROTOCOL:
        raise _Corrupt(f"unsupported legacy protocol version {version!r}")
    header.unpickle(file)  # sys_info: the writer's int sizes; storages are little-endian anyway
    start = file.tell()
    storages = _LegacyStorages()
    # Tensors are rebuilt before their bytes are located, so the object pickle is read twice.
    _Context(path, strict, storages.record).unpickle(file)
    storages.locate(header.unpickle(file), mapped, file.tell())
    file.seek(start)
    return _Context(path, strict, storages.load).unpickle(file)


# --- entry points ---------------------------------------------------------------------------------


def _load(path: str | os.PathLike, strict: bool) -> Any:
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            head = file.read(512)
            if not head:
                raise _Corrupt("the file is empty")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            file.seek(0)
            if head.startswith(b"PK\x03\x04"):
                return _read_zip(file, mapped, name, strict)
            if head[257:262] == b"ustar":
                raise _Corrupt("the tar format of PyTorch < 0.4 is not supported")
            return _read_legacy(file, mapped, name, strict)
    except CheckpointError:
        raise
    except _Corrupt as error:
        raise CheckpointError(f"{name}: {error}") from None
    except OSError as error:
        raise CheckpointError(f"{name}: cannot read the file: {error.strerror or error}") from error
    except (EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{name}: truncated or corrupt pickle ({error})") from error
    except Exception as error:  # a malformed pickle can fail inside any call it makes
        detail = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"{name}: corrupt checkpoint ({detail})") from error


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d flat state dict (HF `pytorch_model.bin`; zip or legacy format).

    Only tensor storages, `OrderedDict`/`dict` and torch's tensor rebuild functions may appear
    in the pickle. Contiguous tensors are read-only views of the memory-mapped file.

    Args:
        path: the checkpoint file.

    Returns:
        Tensor name to numpy array (bfloat16 as `ml_dtypes.bfloat16`), in the file's order.

    Raises:
        UnsafeCheckpointError: the pickle imports anything else (message: the file and global).
        CheckpointError: the file is missing, empty, truncated, not a checkpoint or not a flat
            state dict.
    """
    name = os.fspath(path)
    result = _load(name, strict=True)
    if not isinstance(result, dict):
        raise CheckpointError(f"{name}: holds a {type(result).__name__}, not a flat state dict (load_objects reads it)")
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "this is not a flat state dict (load_objects reads it)"
            )
    return dict(result)


def load_objects(path: str | os.PathLike) -> object:
    """Reads any `torch.save`d object (e.g. a metaseq checkpoint) without importing its classes.

    Tensors become numpy arrays; containers, strings, bytes, numbers, numpy arrays, torch dtypes
    ("torch.float16") and devices ("cuda:0") are read; instances of any other class become inert
    `PickledObject` placeholders: nothing of theirs is imported, constructed or called.

    Args:
        path: the checkpoint file.

    Raises:
        UnsafeCheckpointError: the pickle imports something whose call could act on the system
            (`os.system`, `builtins.eval`, `subprocess.*`, ...); nothing was imported or called.
        CheckpointError: the file is missing, empty, truncated or not a PyTorch checkpoint.
    """
    return _load(path, strict=False)


# --- writing --------------------------------------------------------------------------------------


class _Global(NamedTuple):
    module: str
    name: str


class _Reduce(NamedTuple):
    func: _Global
    args: tuple


class _PersistentId(NamedTuple):
    pid: tuple


class _PickleWriter:
    """Emits the protocol-2 opcodes of a state dict; torch's globals are named, never imported."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2, as torch.save
        self._memo: dict[_Global, int] = {}

    def emit(self, obj: Any) -> None:
        if isinstance(obj, bool):
            self.out += b"\x88" if obj else b"\x89"  # NEWTRUE / NEWFALSE
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
        elif isinstance(obj, _Global):
            self._global(obj)
        elif isinstance(obj, _Reduce):
            self.emit(obj.func)
            self.emit(obj.args)
            self.out += b"R"  # REDUCE
        elif isinstance(obj, _PersistentId):
            self.emit(obj.pid)
            self.out += b"Q"  # BINPERSID
        elif isinstance(obj, tuple):
            self._tuple(obj)
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__}")

    def _int(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.out += b"K" + struct.pack("<B", value)  # BININT1
        elif 0 <= value < 1 << 16:
            self.out += b"M" + struct.pack("<H", value)  # BININT2
        elif -(1 << 31) <= value < 1 << 31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
            self.out += b"\x8a" + struct.pack("<B", len(data)) + data  # LONG1

    def _tuple(self, items: tuple) -> None:
        if not items:
            self.out += b")"  # EMPTY_TUPLE
            return
        if len(items) > 3:
            self.out += b"("  # MARK
        for item in items:
            self.emit(item)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")  # TUPLE1-3, TUPLE

    def _global(self, ref: _Global) -> None:
        if ref in self._memo:
            self.out += b"h" + struct.pack("<B", self._memo[ref])  # BINGET
            return
        self.out += f"c{ref.module}\n{ref.name}\n".encode()  # GLOBAL
        if len(self._memo) < 256:
            self._memo[ref] = len(self._memo)
            self.out += b"q" + struct.pack("<B", self._memo[ref])  # BINPUT

    def ordered_dict(self, items: list[tuple[str, Any]]) -> None:
        self.emit(_Reduce(_Global("collections", "OrderedDict"), ()))
        for start in range(0, len(items), 1000):  # SETITEMS batches, as pickle does
            self.out += b"("
            for key, value in items[start : start + 1000]:
                self.emit(key)
                self.emit(value)
            self.out += b"u"


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch's C-order strides in elements; a size-0 dimension counts as 1 (torch.empty(2, 0): 1, 1)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _state_dict_pickle(arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """data.pkl for arrays that each own storage `str(index)`, as torch.save writes a state dict."""
    writer = _PickleWriter()
    items = []
    for key, (name, array) in enumerate(arrays):
        storage_type = _Global("torch", _WRITE_STORAGES[_native(array.dtype)])
        storage = _PersistentId(("storage", storage_type, str(key), "cpu", array.size))
        stride = _contiguous_strides(array.shape)
        no_hooks = _Reduce(_Global("collections", "OrderedDict"), ())
        args = (storage, 0, tuple(array.shape), stride, False, no_hooks)
        items.append((name, _Reduce(_Global("torch._utils", "_rebuild_tensor_v2"), args)))
    writer.ordered_dict(items)
    writer.out += b"."  # STOP
    return bytes(writer.out)


def _native(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.kind == "V" else dtype.newbyteorder("=")


def _stored_big_endian(dtype: np.dtype) -> bool:
    native_big = dtype.byteorder == "=" and sys.byteorder == "big"
    return dtype.itemsize > 1 and (dtype.byteorder == ">" or native_big)


def _checked_arrays(tensors: Mapping[str, Any], path: str) -> list[tuple[str, np.ndarray]]:
    arrays = []
    for name, value in tensors.items():
        # Array-likes with a shape and dtype (memory-mapped or lazily computed tensors) stay as they are until
        # their bytes are written, so saving holds one tensor in memory at a time, not the model.
        array = value if _is_array_like(value) else np.asarray(value)
        if not isinstance(name, str) or _native(array.dtype) not in _WRITE_STORAGES:
            supported = ", ".join(str(d) for d in _WRITE_STORAGES)
            raise CheckpointError(
                f"{path}: cannot write tensor {name!r} of dtype {array.dtype}; names must be "
                f"strings and dtypes one of {supported}"
            )
        arrays.append((name, array))
    return arrays


def _is_array_like(value: Any) -> bool:
    return all(hasattr(value, attr) for attr in ("shape", "dtype", "size", "__array__"))


def _little_endian_chunks(array: np.ndarray):
    """The tensor's bytes in C order, little-endian, in chunks (at most one copy of this tensor)."""
    contiguous = np.ascontiguousarray(array)
    if _stored_big_endian(array.dtype):
        contiguous = _byteswapped(contiguous)  # swaps raw bytes, whatever the dtype's byte order
    flat = contiguous.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        yield flat[start : start + _CHUNK]


def _write_entry(archive: zipfile.ZipFile, file: IO[bytes], name: str, size: int, chunks) -> None:
    """Adds a stored entry whose data starts on a 64-byte boundary (padded in its extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    # zipfile appends a 20-byte zip64 record to the local header under exactly this condition.
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    padding = -(file.tell() + header) % _ALIGN
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding  # miniz's padding, as torch
    with archive.open(info, "w", force_zip64=zip64) as entry:
        for chunk in chunks:
            entry.write(chunk)


def save_state_dict(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes tensors in the zip format of `torch.save(state_dict)`, one storage per tensor.

    The file loads with `torch.load(path, weights_only=True)` (and `mmap=True`) and in HF
    transformers as `pytorch_model.bin`. Tensors are streamed one at a time; the caller handles
    temporary files.

    Args:
        tensors: name to array; dtypes float32, float16, bfloat16 (`ml_dtypes`), float64, int64,
            int32, int16, int8, uint8 or bool. Non-contiguous arrays are written in C order.
        path: the file to write.

    Raises:
        CheckpointError: a name is not a string or a dtype is not supported; nothing is written.
    """
    name = os.fspath(path)
    arrays = _checked_arrays(tensors, name)
    data_pkl = _state_dict_pickle(arrays)
    with open(name, "wb") as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        _write_entry(archive, file, "archive/data.pkl", len(data_pkl), [data_pkl])
        _write_entry(archive, file, "archive/byteorder", 6, [b"little"])
        for key, (_, array) in enumerate(arrays):
            _write_entry(
                archive, file, f"archive/data/{key}", array.size * array.dtype.itemsize, _little_endian_chunks(array)
            )
        _write_entry(archive, file, "archive/version", 2, [b"3\n"])
