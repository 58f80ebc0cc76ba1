"""int8 weight-only layers for the PyTorch models: `Int8Linear` and its LoRA wrapper `LoraInt8Linear`.

What needs no framework (which weights, the rounding, the files, the checks) is `opt_core.quantization`; here is
how an int8 weight computes. `PreTrainedOPT.quantize("int8")` and `from_pretrained(..., quantize="int8")` swap the
decoder's `nn.Linear`s for `Int8Linear`s, which keep the names: `weight` (int8 [out, in], frozen), `weight_scale`
(float32 [out], a buffer) and `bias`, so `state_dict()` is the file's layout.

The forward uses `torch.ops.aten._weight_int8pack_mm(x, q, scale)` (torch 2.13, CPU), measured by experiment:
* activations and scales must share a dtype (bf16, fp16 or fp32); the result has that dtype.
* with fp32 activations it is a slow reference loop: the 72 products of an opt-125m decode step took 356 ms at
  batch 1, against 13 ms with bf16 activations and 22 ms for fp32 `F.linear` (2 shared cores). So activations are
  cast to bfloat16 for it and the result back to the input's dtype.
* with bf16 activations, in_features that are not a multiple of 16 give wrong results (K = 8, 24, 40: relative
  error 0.2-1.1) or crash the process (K = 33, 100); multiples of 16 are right (error 3e-3, bf16 rounding).
* it has no autograd formula.
Otherwise (another device, other in_features, or a gradient needed, as for LoRA training over the frozen base) the
layer computes `F.linear(x, q * scale)` with the weight dequantized in float32 and cast to x's dtype: the same
math as the float model holding the dequantized weights. Under `torch.compile` a one-row product with no gradient
(a compiled decode step at batch one) is a multiply-sum over the int8 weight in x's dtype (`int8_linear`), which
Inductor fuses into one loop.

Siblings: none. Keras and Flax load int8 folders dequantized: XLA CPU's int8 products are slower than its fp32
(BENCHMARKS.md, issue 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opt_torch.linear import one_row_inference, one_row_product
from opt_torch.lora import LoraLinear

PACK_MM_DTYPE = torch.bfloat16  # the op's fastest activation dtype on CPU (above)
PACK_MM_MULTIPLE = 16  # in_features the bf16 op computes right


def has_pack_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """x [..., in] @ (weight int8 [out, in] * scale [out]).T + bias, in x's dtype."""
    if torch.compiler.is_compiling() and one_row_inference(x):
        # One row under torch.compile (a compiled decode step at batch one): the multiply-sum Inductor fuses into one
        # vectorized loop that reads each int8 byte once, in x's dtype, then the scales. The int8 LM head of opt-125m
        # took 0.72 ms that way against 1.28 ms through the packed op (`benchmarks/linear_kernels.py --rows 1`), and
        # compiled int8 decode at batch one went from 0.7x eager's speed to 1.33x (`benchmarks/decode.py`).
        out = one_row_product(x, weight, None) * scale.to(x.dtype)
        return out if bias is None else out + bias.to(x.dtype)
    if _packed_path(x, weight):
        flat = x.reshape(-1, x.shape[-1])  # ... in -> M in
        # Inductor's lowering of the aten op asserts on inputs computed in the graph (the casts), so a compiled
        # step calls it through an opaque custom op; eager calls it directly (the custom op's dispatch costs).
        matmul = _packed_matmul if torch.compiler.is_compiling() else _packed_matmul_eager
        out = matmul(flat, weight, scale).reshape(*x.shape[:-1], weight.shape[0])  # M out -> ... out
        return out if bias is None else out + bias.to(x.dtype)
    dequantized = (weight.float() * scale.float()[:, None]).to(x.dtype)
    return F.linear(x, dequantized, None if bias is None else bias.to(x.dtype))


def _packed_matmul_eager(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """M in (any float dtype) -> M out in x's dtype, the activations in bfloat16 (the op's fast path)."""
    packed = x.to(PACK_MM_DTYPE).contiguous()
    return torch.ops.aten._weight_int8pack_mm(packed, weight, scale.to(PACK_MM_DTYPE)).to(x.dtype)


@torch.library.custom_op("opt_lm::int8_pack_mm", mutates_args=())
def _packed_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _packed_matmul_eager(x, weight, scale)


@_packed_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _packed_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.shape[1] % PACK_MM_MULTIPLE == 0
        and not (torch.is_grad_enabled() and x.requires_grad)
        and has_pack_mm()
    )


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and float32 per-output-channel scales (`opt_core.quantization`).

    Args:
        in_features, out_features: as nn.Linear.
        bias: whether it has a bias (float, trainable as nn.Linear's).
        device: where to allocate (the meta device when loading).
        dtype: the bias's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor, scale: torch.Tensor) -> Int8Linear:
        """An Int8Linear holding `weight` (int8) and `scale`, with `linear`'s bias parameter itself."""
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = scale
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with: weight * scale."""
        return self.weight.float() * self.weight_scale.float()[:, None]

    def lora_wrapper(self) -> LoraInt8Linear:
        """The LoRA layer `opt_torch.lora` puts in this layer's place."""
        return LoraInt8Linear(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class LoraInt8Linear(LoraLinear):
    """LoRA over a frozen int8 base: `int8_linear(x) + scaling * B(A(dropout(x)))`, the LoRA pair float32.

    Merging is refused: the merged weight would need a second rounding to int8, which unmerge could not undo and
    which would add the int8 error of the delta to the base's. Merge on a float base, then quantize.
    """

    def __init__(self, base: Int8Linear):
        super().__init__(base)  # takes over base.weight (int8) and base.bias
        self.register_buffer("weight_scale", base.weight_scale)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def check_merge(self) -> None:
        raise ValueError(
            "cannot merge a LoRA adapter into int8 weights: the sum would be rounded to int8 again (and could not "
            "be unmerged). Load the base in float (from_pretrained without quantize=), merge_and_unload(), "
            "then quantize('int8')"
        )

    def merge(self, name: str) -> None:
        self.check_merge()

    def to_linear(self) -> Int8Linear:
        layer = Int8Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight, layer.weight_scale, layer.bias = self.weight, self.weight_scale, self.bias
        return layer
