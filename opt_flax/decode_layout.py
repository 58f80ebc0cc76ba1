"""The decode-time layout of the dense kernels: [out, in] views that XLA CPU's matrix-vector products read faster.

Siblings: `opt_tf/decode_layout.py` decodes with the same layout (a per-layer [out, in] copy); `opt_torch` needs none
(its weights are stored [out, in]). Whether the copy pays is decided once for both, in
`opt_core.generation.decode_layout_pays`: on CPUs, for decode steps of one row (batch one, no beams), up to
`DECODE_LAYOUT_MAX_BYTES` of parameters. Measured on this project's 2-core CPU (`python benchmarks/flax_step.py
--batch B --layout stored|copy`), opt-125m greedy decode at batch 1: 64.1-69.7 tokens/s with the stored kernels,
71.6-76.3 with these (three alternating runs); at batch 8 283.1 against 225.3, so more rows read the stored kernels.

`decode_params` replaces every 2-D dense `kernel` ([in, out]) with `kernel_t` ([out, in]), which
`opt_flax.modeling.OPTDense` contracts on its last dimension; a `DecodeLayout` keeps that view on the model while
the same params are passed (JAX arrays are immutable, so their identity is the key). Memory: a transposed copy of
the dense kernels (340 MB for opt-125m in fp32) after the first `generate`; other params rebuild it and free the
previous copy.

An active LoRA adapter in the params (`opt_flax.lora`) is merged into this view (`opt_flax.lora.merged_view`, the
kernels `merge_adapter` would give, bit for bit), so decoding pays no branch matmuls; where the view does not pay,
`generate` decodes with the branch in each `OPTDense`.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from opt_core.generation import decode_layout_pays
from opt_flax.lora import merged_view, use_adapter_values


def decode_params(params):
    """The params with every 2-D dense `kernel` replaced by `kernel_t`, its [out, in] transpose; the originals
    are unchanged. Embedding tables are already [V, E] and are left alone. An adapter is merged in first."""

    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for name, value in tree.items():
            if name == "kernel" and getattr(value, "ndim", 0) == 2:
                out["kernel_t"] = jnp.swapaxes(value, 0, 1)
            else:
                out[name] = convert(value)
        return out

    return convert(merged_view(flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params))


class DecodeLayout:
    """The [out, in] view of one model's params, rebuilt only when other params are passed."""

    def __init__(self):
        self.leaves: tuple = ()
        self.params = None

    def params_for(self, params, rows: int):
        """`decode_params(params)` where the layout pays for decode steps of `rows` rows, else the params the
        modules read (an adapter's copies and trained biases in place, `opt_flax.lora.use_adapter_values`)."""
        leaves = tuple(jax.tree.leaves(params))
        nbytes = sum(leaf.nbytes for leaf in leaves)
        if not decode_layout_pays(nbytes, on_cpu=jax.default_backend() == "cpu", rows=rows):
            return use_adapter_values(params)
        if len(leaves) != len(self.leaves) or any(a is not b for a, b in zip(leaves, self.leaves)):
            self.leaves, self.params = leaves, decode_params(params)  # the leaves keep their ids valid
        return self.params
