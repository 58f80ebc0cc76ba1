"""The floating-point dtypes OPT weights are stored and computed in, named once for every framework.

Each framework turns these names into its own dtype objects (`torch.float16`, a Keras policy, `jnp.float16`);
the rules (which names exist, what "auto" means) live here only.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# The dtypes a model can be loaded, computed and saved in, with their numpy types (bfloat16 through ml_dtypes).
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def dtype_name(dtype: Any) -> str:
    """ "float16" for "float16", "torch.float16", torch.float16, np.float16, tf.float16 or jnp.float16."""
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    name = getattr(dtype, "name", None)  # np.dtype, tf.DType
    if isinstance(name, str):
        return name
    try:
        return np.dtype(dtype).name  # numpy scalar types, jnp dtypes
    except TypeError:
        return str(dtype).removeprefix("torch.")  # torch.dtype


def check_dtype(dtype: Any, allowed=tuple(FLOAT_DTYPES)) -> str:
    """The name of a supported dtype; a ValueError naming the choices otherwise."""
    name = dtype_name(dtype)
    if name not in allowed:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(allowed)}")
    return name


def resolve_dtype(dtype: Any, stored: Any = None, allowed=tuple(FLOAT_DTYPES)) -> str:
    """The dtype a model is loaded in: float32 by default whatever the checkpoint stores (as HF); "auto" keeps the
    stored dtype (float32 when the checkpoint stores none of `allowed`)."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, str) and dtype == "auto":
        name = dtype_name(stored) if stored is not None else "float32"
        return name if name in allowed else "float32"
    try:
        return check_dtype(dtype, allowed)
    except ValueError:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto' or one of {', '.join(allowed)}") from None


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a supported dtype name (or of any dtype object naming one)."""
    return np.dtype(FLOAT_DTYPES[check_dtype(dtype)])
