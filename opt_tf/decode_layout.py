"""The decode-time layout of the dense kernels: [out, in] copies that XLA CPU's matrix-vector products read faster.

Siblings: `opt_flax` decodes with the same layout (a `kernel_t` view of its params); `opt_torch` needs none (its
weights are stored [out, in]). Whether the copy pays is decided once for both, in
`opt_core.generation.decode_layout_pays`: on CPUs, for decode steps of one row (batch one, no beams), up to
`DECODE_LAYOUT_MAX_BYTES` of kernels. With more rows XLA computes matrix-matrix products, which read the stored
[in, out] kernels much faster (opt-125m at batch 8: 248.6 tokens/s against 189.9 with the copy,
`benchmarks/tf_step.py --batch 8 --layout stored|copy`).

Measured on the 2-core AVX-512 CPU this project benchmarks on, for the 24 fc1/fc2 products of an opt-125m step at
batch 1 in one XLA program: [in, out] 11.9 ms without biases, [out, in] 10.0 ms; adding the biases costs 3-5 ms more
whatever the layout, because XLA CPU output-fuses each bias add into its matrix-vector product and emits the pair as
a slow loop; a bias column read by the product itself (the input gets a trailing 1) takes 9.9 ms. So a `DecodeLayout`
holds, per `OPTDense` layer, its kernel transposed to [out, in] (torch's layout) with the bias appended as a last
column ([out, in + 1]).

`generate` keeps one `DecodeLayout` per model, made at its first one-row call, refreshes it from the layers' weights
before every one-row call (one transposed
copy, so never stale after training, loading or a change of adapter) and calls the model with `decode_layout=<it>`
inside its compiled programs. With an active LoRA adapter (`opt_tf.lora`) the copy holds the weights the layer
computes with: its kernel plus the unmerged scaling * A @ B, or its modules_to_save copy; a layer reading the copy
adds no LoRA branch. `decode_layout` is a Keras call-context argument (as `training` is): Keras hands it to every
`OPTDense` the call reaches, without the layers in between passing it on. Any other call leaves it None, and the
layers read `kernel` and `bias` as usual. Memory: a second copy of every dense kernel (340 MB for opt-125m in fp32),
kept while the model lives.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core.generation import decode_layout_pays  # noqa: E402
from opt_tf import lora  # noqa: E402
from opt_tf.shapes import dims  # noqa: E402


class OPTDense(keras.layers.Dense):
    """`keras.layers.Dense` that reads its [out, in] kernel from a `DecodeLayout` when a call passes one, and
    applies its active LoRA adapter (`opt_tf.lora`) otherwise."""

    applies_adapters = True  # opt_tf.lora: this layer's call applies its adapters itself

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_call_context_args("decode_layout")

    def call(self, inputs, decode_layout: DecodeLayout | None = None, training=None):
        kernel = decode_layout.kernel(self) if decode_layout is not None else None
        if kernel is None:
            weights = lora.active_weights(self)
            if weights is None:
                return super().call(inputs)
            return lora.adapted_dense_call(self, weights, super().call, inputs, training)
        kernel = tf.cast(kernel, inputs.dtype)  # out in(+1)
        batch_shape = dims(inputs)[:-1]
        flat = tf.reshape(inputs, (-1, inputs.shape[-1]))  # N in
        if self.use_bias:
            ones = tf.ones((flat.shape[0], 1), flat.dtype) if flat.shape[0] is not None else tf.ones_like(flat[:, :1])
            flat = tf.concat([flat, ones], axis=1)  # N in+1: the 1 picks up the bias column
        # kernel @ flat^T, then transposed back: XLA then contracts the kernel's last dimension in place, where
        # `matmul(flat, kernel, transpose_b=True)` adds a transpose of the kernel that XLA CPU fuses into a loop.
        outputs = tf.transpose(tf.matmul(kernel, flat, transpose_b=True))  # N out
        return tf.reshape(outputs, [*batch_shape, self.units])


def dense_layers(model: keras.layers.Layer) -> list[OPTDense]:
    """The model's built `OPTDense` layers."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, OPTDense) and layer.built]


class DecodeLayout:
    """The [out, in] kernels (bias as a last column) of a model's dense layers, read inside `generate`'s programs.

    Holds one non-trainable `tf.Variable` per layer, outside Keras' tracking: never in `model.weights`, a weights
    file or a SavedModel. Programs traced with it read the variables, so `refresh` reaches them without a retrace.
    """

    def __init__(self):
        self.kernels: dict[OPTDense, tf.Variable] = {}

    @staticmethod
    def pays(layers: list[OPTDense], rows: int) -> bool:
        """Whether decode steps of `rows` rows should read the copy: on CPU, at one row, for kernels up to
        DECODE_LAYOUT_MAX_BYTES (`opt_core.generation.decode_layout_pays`)."""
        on_cpu = not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
        nbytes = sum(int(np.prod(layer.kernel.shape)) * tf.as_dtype(layer.kernel.dtype).size for layer in layers)
        return decode_layout_pays(nbytes, on_cpu, rows)

    def refresh(self, layers: list[OPTDense]) -> None:
        """(Re)writes every layer's [out, in] kernel from the weights it computes with now (eagerly, before any
        program runs): its own, or with its active adapter's (`opt_tf.lora.effective_kernel_and_bias`)."""
        for layer in layers:
            kernel, bias = lora.effective_kernel_and_bias(layer)
            kernel = tf.transpose(kernel)  # out in
            if layer.use_bias:
                kernel = tf.concat([kernel, tf.cast(bias, kernel.dtype)[:, None]], axis=1)  # out in+1
            if layer in self.kernels:
                self.kernels[layer].assign(kernel)
            else:
                self.kernels[layer] = tf.Variable(kernel, trainable=False, name=f"{layer.name}_decode_kernel")

    def kernel(self, layer: OPTDense) -> tf.Variable | None:
        return self.kernels.get(layer)
