"""numpy arrays <-> torch tensors, bfloat16 included (numpy has none of its own: ml_dtypes' is the one JAX and TF
use). Used by loading, saving, the adapters and the trainer."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import torch


def numpy_to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor of `dtype` from a (possibly read-only, memory-mapped, strided) array."""
    if array.dtype == ml_dtypes.bfloat16:
        array = array.view(np.int16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we copy below, never write
            tensor = torch.from_numpy(array).view(torch.bfloat16)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
