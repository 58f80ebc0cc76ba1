"""The dense layer of the PyTorch models: `nn.Linear`, plus a oneDNN-packed copy of its weight for CPU decoding.

A CPU decode step multiplies every dense weight by one row of activations (or a few), and `F.linear`'s MKL path reads
the weights far below the memory's speed at those sizes. oneDNN's linear over a weight reordered once into its own
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, then `_linear_pointwise`, the ops Inductor's freezing
uses) reads them much faster. Measured by `python benchmarks/linear_kernels.py` (BENCHMARKS.md) on this project's 2-core
machine with torch 2.13, the 73 products of an opt-125m decode step took 29.2 ms with `F.linear` against 21.3 ms
packed at batch 1, 38.0 against 21.0 ms at batch 8; in bfloat16 (AVX512-BF16, no AMX) 15.5 against 8.6 ms and
12.2 against 8.4 ms. The results differ from `F.linear`'s by summation order only (about 4e-6 relative in fp32).

So `generate` (`opt_torch.generation.prepare_decoding`) packs the float32 and bfloat16 weights of the model's
`Linear`s once, when the copies fit in half the memory the OS reports available, and sets `PACKED` while it
decodes: only then do the layers compute packed, so `forward` and training give exactly what they gave before. A
layer whose weight has changed since it was packed (training, a merged adapter) computes with `F.linear` until the
next `generate` packs it again.

Inside `torch.compile` (`generate(compile=True)`) the packed tensor is opaque to Inductor and is not used. There a
product of one row (a decode step at batch one) with no autograd is written as a multiply-sum
(`one_row_product`), which Inductor fuses into one vectorized loop over the weight split across the threads; every
other product is `F.linear`. The 73 products of a step took 11.9 ms that way against 14.6 ms packed in eager and
29.6 ms with `F.linear` (`benchmarks/linear_kernels.py`, the same run), and a whole compiled step at batch one
went from slower than eager to faster (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Set by the decode loops (and the serving step) while they run: the layers use their packed weights.
PACKED = contextvars.ContextVar("opt_torch_packed_linears", default=False)
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # measured above; float16 not (no AVX512-FP16 here)


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters, names and math) that computes with `packed`, a oneDNN-packed copy of its
    weight, while `PACKED` is set and the weight is the one it was packed from."""

    # (packed weight, `weight_identity` of the weight it came from, that weight: held so its memory, the identity's
    # address, is not reused by another tensor while the copy lives)
    packed: tuple[torch.Tensor, tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            weight = self.weight
            if one_row_inference(x) and type(weight) is nn.Parameter and weight.dtype in PACKED_DTYPES:
                return one_row_product(x, weight, self.bias)
            return F.linear(x, weight, self.bias)
        if self.packed is not None and PACKED.get():
            packed, packed_from, _ = self.packed
            if packed_from == weight_identity(self.weight) and x.dtype == packed.dtype and x.device.type == "cpu":
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def is_packed(self) -> bool:
        """A packed copy of the current weight exists."""
        return self.packed is not None and self.packed[1] == weight_identity(self.weight)

    def pack(self) -> int:
        """Makes (or keeps) the packed copy of the current weight; returns the bytes of a new copy (0 if none)."""
        if self.is_packed():
            return 0
        weight = self.weight
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            self.packed = (packed, weight_identity(weight), weight.detach())
        return weight.numel() * weight.element_size()

    def __getstate__(self) -> dict:
        # The packed copy is an opaque oneDNN tensor, which copy.deepcopy and torch.save cannot read; the next
        # generate packs again.
        return {**super().__getstate__(), "packed": None}


def one_row_inference(x: torch.Tensor) -> bool:
    """One row of activations on the CPU with no gradient to track: a decode step at batch one, whose products
    `one_row_product` computes faster under `torch.compile` (the docstring at the top)."""
    return x.numel() == x.shape[-1] and x.device.type == "cpu" and not torch.is_grad_enabled()


def one_row_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` for one row, written as the multiply-and-sum Inductor fuses into one vectorized, threaded pass
    over the weight (a matrix-vector product near the memory's speed), where the mm would call MKL's slower one."""
    y = (x.unsqueeze(-2) * weight).sum(-1)  # ... 1 K * N K -> ... N
    return y if bias is None else y + bias


def weight_identity(weight: torch.Tensor) -> tuple:
    """What a packed copy is checked against: the weight's memory and in-place write count, so `.data =`, `.to()`,
    `load_state_dict` and optimizer steps all make the copy stale."""
    return weight.data_ptr(), weight._version, weight.dtype, weight.device


def packable(module: nn.Module) -> bool:
    """A `Linear` on the CPU in a packed dtype, with a plain weight (not an int8 layer, not a DTensor shard)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, Linear)
        and type(weight) is nn.Parameter
        and weight.device.type == "cpu"
        and weight.dtype in PACKED_DTYPES
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.backends.mkldnn.is_available()
    )


def pack_linears(modules: list[nn.Module], budget: int) -> None:
    """Packs every packable `Linear` of `modules` whose weight changed since (all of them the first time), if the
    copies of the ones not packed yet fit in `budget` bytes; otherwise packs none."""
    layers = [m for m in modules if packable(m)]
    fresh = [m for m in layers if not m.is_packed()]
    if sum(m.weight.numel() * m.weight.element_size() for m in fresh) > budget:
        return
    for layer in fresh:
        layer.pack()


@contextlib.contextmanager
def packed_linears() -> Iterator[None]:
    """The packed weights are used inside this block (the decode loops)."""
    token = PACKED.set(True)
    try:
        yield
    finally:
        PACKED.reset(token)
