"""The matrix-vector products of one opt-125m decode step, alone: PyTorch (oneDNN/MKL) against XLA (JAX), fp32.

    python benchmarks/gemv.py

Times a function holding only the 73 weight reads of one greedy step at batch 1 (q, k, v, out, fc1, fc2 per layer
and the tied LM head), with no attention, norms or cache: what each framework's kernels make of the memory-bound
part of decoding. Reports ms per step and the effective read bandwidth.
"""

from __future__ import annotations

import time

import numpy as np


def weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    layer = lambda: {
        n: rng.standard_normal(s).astype(np.float32) * 0.02
        for n, s in (  # noqa: E731
            ("q", (768, 768)),
            ("k", (768, 768)),
            ("v", (768, 768)),
            ("o", (768, 768)),
            ("fc1", (768, 3072)),
            ("fc2", (3072, 768)),
        )
    }
    return [layer() for _ in range(12)], rng.standard_normal((50272, 768)).astype(np.float32) * 0.02


def step(x, layers, embedding, relu):
    for w in layers:
        h = x + x @ w["q"] + x @ w["k"] + x @ w["v"]
        h = h + h @ w["o"]
        x = h + relu(h @ w["fc1"]) @ w["fc2"]
    return x @ embedding.T  # the tied LM head reads the token embedding (V, E)


def best_of(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import jax
    import jax.numpy as jnp
    import torch

    layers, embedding = weights()
    nbytes = sum(a.nbytes for w in layers for a in w.values()) + embedding.nbytes
    x = np.ones((1, 768), np.float32)
    t_layers = [{k: torch.from_numpy(v) for k, v in w.items()} for w in layers]
    t_embedding, t_x = torch.from_numpy(embedding), torch.from_numpy(x)
    with torch.no_grad():
        torch_s = best_of(lambda: step(t_x, t_layers, t_embedding, torch.relu))
    j_layers = jax.tree.map(jnp.asarray, layers)
    j_embedding, j_x = jnp.asarray(embedding), jnp.asarray(x)
    jitted = jax.jit(lambda x, layers, embedding: step(x, layers, embedding, jax.nn.relu))
    jax_s = best_of(lambda: jitted(j_x, j_layers, j_embedding).block_until_ready())
    print(f"weights read per step: {nbytes / 1e6:.0f} MB; torch threads {torch.get_num_threads()}")
    for name, seconds in (("torch", torch_s), ("jax/XLA", jax_s)):
        print(f"{name:<8} {seconds * 1e3:6.1f} ms/step  {nbytes / seconds / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
