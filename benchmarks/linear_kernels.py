"""The dense products of one opt-125m decode step through each kernel the frameworks offer on a CPU, in one run.

    python benchmarks/linear_kernels.py [--rows 1 8] [--repeats 7]

The 73 weight products of one greedy step (q, k, v, out, fc1, fc2 in 12 layers, then the tied 50272 x 768 LM
head), with no attention, norms or cache, for `--rows` rows of activations: what decides a CPU decode step's speed.
Every weight is a distinct tensor, so the products read memory as a step does (495 MB in fp32, more than any cache).

Rows (ms per step, best of `--repeats`):
* torch `F.linear`, weights [out, in] as loaded; the same with the weights stored transposed (opt_torch's LM head
  during generate); MKL's packed GEMM (`torch.ops.mkl._mkl_linear`); oneDNN's packed linear
  (`torch.ops.mkldnn._linear_pointwise`, opt_torch's dense layers during generate); in bfloat16 plain and packed;
  int8 weights through `torch.ops.aten._weight_int8pack_mm` with bf16 activations (opt_torch's int8 layers).
* `torch.compile` of what a `generate(compile=True)` step computes for each product: at one row
  `opt_torch.linear.one_row_product` (a multiply-sum Inductor fuses into one threaded, vectorized pass over the
  weight), at more the mm; fp32, bf16, and int8 weights (`opt_torch.quantization.int8_linear`: at one row a
  multiply-sum over the int8 bytes with fp32 activations, at more the packed op). Each product is a call of the
  compiled function, with its guards (tens of microseconds each), which a compiled step pays once: the LM head
  row shows the kernel alone.
* XLA CPU (`jax.jit`), kernels [in, out]: fp32, bf16, int8 weights dequantized in the product (what an int8
  Keras or Flax model would compute), and int8 weights [out, in] in a multiply-sum over 16-element blocks (a fused
  loop that reads the int8 bytes once: the formulation of an int8 product XLA CPU runs fastest, measured).
* The torch rows again for the LM head alone (50272 x 768, 154 MB in fp32).
"""

from __future__ import annotations

import argparse

import numpy as np
from gemv import best_of  # the sibling script's timer (benchmarks/ is on the path when a script here runs)

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]  # [out, in] of q, k, v, out_proj, fc1, fc2
LAYERS, HEAD = 12, (50272, 768)


def weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [shape for _ in range(LAYERS) for shape in SHAPES] + [HEAD]
    return [rng.standard_normal(shape, dtype=np.float32) * 0.02 for shape in shapes]


def best_ms(fn, repeats: int) -> float:
    return best_of(fn, repeats) * 1e3


def torch_rows(arrays: list[np.ndarray], rows: int, repeats: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from opt_torch.linear import one_row_product
    from opt_torch.quantization import int8_linear

    weights = [torch.from_numpy(a) for a in arrays]
    inputs = {dt: {k: torch.randn(rows, k, dtype=dt) for k in (768, 3072)} for dt in (torch.float32, torch.bfloat16)}

    def run(ws, product, dtype=torch.float32):
        x = inputs[dtype]
        return lambda: [product(x[w.shape[1]], w, p) for w, p in ws]

    plain = [(w, None) for w in weights]
    transposed = [(w.t().contiguous().t(), None) for w in weights]
    mkl = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, rows)) for w in weights]
    onednn = [(w, torch.ops.mkldnn._reorder_linear_weight(w, 1)) for w in weights]
    bf16 = [(w.bfloat16(), None) for w in weights]
    bf16_packed = [(w, torch.ops.mkldnn._reorder_linear_weight(w, 1)) for w, _ in bf16]
    int8 = []
    for w in weights:
        scale = w.abs().amax(dim=1) / 127
        int8.append((torch.round(w / scale[:, None]).to(torch.int8).clone(), scale.bfloat16()))
    linear = lambda x, w, p: F.linear(x, w)  # noqa: E731
    # what a `generate(compile=True)` step computes: at one row opt_torch's fused multiply-sum, else the mm; one
    # compilation per weight shape and dtype (more than dynamo's default limit, past which it would run eagerly)
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(lambda x, w: one_row_product(x, w, None) if rows == 1 else F.linear(x, w), dynamic=False)
    compiled_int8 = torch.compile(lambda x, q, s: int8_linear(x, q, s, None), dynamic=False)
    pointwise = lambda x, w, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
    with torch.no_grad():
        return {
            "torch F.linear fp32, [out, in]": best_ms(run(plain, linear), repeats),
            "torch F.linear fp32, stored transposed": best_ms(run(transposed, linear), repeats),
            "torch MKL packed fp32": best_ms(
                run(mkl, lambda x, w, p: torch.ops.mkl._mkl_linear(x, p, w, None, rows)), repeats
            ),
            "torch oneDNN packed fp32": best_ms(run(onednn, pointwise), repeats),
            "torch.compile fp32 (one row: multiply-sum)": best_ms(run(plain, lambda x, w, p: compiled(x, w)), repeats),
            "torch F.linear bf16": best_ms(run(bf16, linear, torch.bfloat16), repeats),
            "torch.compile bf16 (one row: multiply-sum)": best_ms(
                run(bf16, lambda x, w, p: compiled(x, w), torch.bfloat16), repeats
            ),
            "torch oneDNN packed bf16": best_ms(run(bf16_packed, pointwise, torch.bfloat16), repeats),
            "torch int8 _weight_int8pack_mm (bf16 act.)": best_ms(
                run(int8, lambda x, q, s: torch.ops.aten._weight_int8pack_mm(x, q, s), torch.bfloat16), repeats
            ),
            "torch.compile int8 (one row: multiply-sum, fp32 act.)": best_ms(
                run(int8, lambda x, q, s: compiled_int8(x, q, s)), repeats
            ),
        }


def jax_rows(arrays: list[np.ndarray], rows: int, repeats: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    kernels = [jnp.asarray(a.T) for a in arrays]  # [in, out], as Flax and Keras hold them
    scales = [np.abs(a).max(axis=1) / 127 for a in arrays]
    q = [jnp.asarray(np.round(a.T / s).astype(np.int8)) for a, s in zip(arrays, scales)]  # [in, out]
    q_rows = [jnp.asarray(np.round(a / s[:, None]).astype(np.int8)) for a, s in zip(arrays, scales)]  # [out, in]
    scales = [jnp.asarray(s) for s in scales]
    rng = np.random.default_rng(1)  # random arguments: XLA would simplify a product by a constant of ones
    x = {k: jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32)) for k in (768, 3072)}

    def lanes(x, w):
        """x [R, K] by int8 w [N, K] as a multiply-sum over 16-element blocks of K (XLA vectorizes the blocks)."""
        (n, k), r = w.shape, x.shape[0]
        blocks = x.reshape(r, 1, k // 16, 16) * w.reshape(1, n, k // 16, 16).astype(jnp.float32)
        return blocks.sum(axis=2).sum(axis=-1)

    fp32 = jax.jit(lambda x, ws: [x[w.shape[0]] @ w for w in ws])
    bf16 = jax.jit(lambda x, ws: [(x[w.shape[0]].astype(jnp.bfloat16) @ w).astype(jnp.float32) for w in ws])
    int8 = jax.jit(lambda x, ws, ss: [x[w.shape[0]] @ w.astype(jnp.float32) * s for w, s in zip(ws, ss)])
    int8_sum = jax.jit(lambda x, ws, ss: [lanes(x[w.shape[1]], w) * s for w, s in zip(ws, ss)])
    bf16_kernels = [k.astype(jnp.bfloat16) for k in kernels]
    ready = jax.block_until_ready
    return {
        "XLA fp32": best_ms(lambda: ready(fp32(x, kernels)), repeats),
        "XLA bf16": best_ms(lambda: ready(bf16(x, bf16_kernels)), repeats),
        "XLA int8 dequantized in the product": best_ms(lambda: ready(int8(x, q, scales)), repeats),
        "XLA int8 as a multiply-sum over 16-lane blocks": best_ms(lambda: ready(int8_sum(x, q_rows, scales)), repeats),
    }


def head_rows(arrays: list[np.ndarray], rows: int, repeats: int) -> dict[str, float]:
    """The tied LM head alone (the last weight), as opt_torch's generate computes it: fp32 as loaded, stored
    transposed, oneDNN-packed, and int8 (an int8 model's decode)."""
    return {
        f"LM head alone: {name.removeprefix('torch ')}": ms
        for name, ms in torch_rows(arrays[-1:], rows, repeats).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch

    arrays = weights()
    megabytes = sum(a.nbytes for a in arrays) / 1e6
    print(
        f"73 products, {megabytes:.0f} MB of fp32 weights; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = {
        rows: {
            **torch_rows(arrays, rows, args.repeats),
            **jax_rows(arrays, rows, args.repeats),
            **head_rows(arrays, rows, args.repeats),
        }
        for rows in args.rows
    }
    print(f"\n{'kernel':<62}" + "".join(f"{f'{rows} rows ms':>12}" for rows in args.rows))
    for name in results[args.rows[0]]:
        print(f"{name:<62}" + "".join(f"{results[rows][name]:>12.2f}" for rows in args.rows))


if __name__ == "__main__":
    main()
