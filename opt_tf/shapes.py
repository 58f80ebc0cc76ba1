"""Shapes inside traced programs: static Python ints where the trace knows them, tensors only where it does not.

Every `tf.shape(x)[i]` adds a Shape, a StridedSlice and three constants to the graph, and `generate`'s programs
trace the model twice (prefill and step) with all shapes known; dropping those ops made the decode program's graph
smaller and its first call faster (`benchmarks/first_call.py`).
"""

from __future__ import annotations

import tensorflow as tf


def dims(x: tf.Tensor) -> list:
    """x's shape as a list: an int where the dimension is static, a scalar int32 tensor where it is not."""
    static = x.shape.as_list()
    if None not in static:
        return static
    dynamic = tf.shape(x)
    return [size if size is not None else dynamic[i] for i, size in enumerate(static)]
