"""Per-token time of Flax greedy decode (opt-125m shape, random weights, fp32), for profiling changes quickly.

    python benchmarks/flax_step.py [--batch 1] [--layout rule|copy|stored]

Times (best of several) `generate` with 128 new tokens, as `benchmarks/decode.py` does, without the other
frameworks. `--layout`: the kernels generate decodes with, by its rule (`rule`, the default:
`opt_core.generation.decode_layout_pays`, the [out, in] view at one row only), or always the view (`copy`,
`opt_flax.decode_layout.decode_params`), or always the params as stored (`stored`, [in, out] kernels).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layout", choices=("rule", "copy", "stored"), default="rule")
    args = parser.parse_args()

    import opt_flax
    import opt_flax.decode_layout
    from opt_core import OPTConfig

    if args.layout != "rule":
        opt_flax.decode_layout.decode_layout_pays = lambda *a, **k: args.layout == "copy"
    config = OPTConfig.from_preset("opt-125m")
    model = opt_flax.FlaxOPTForCausalLM(config)
    ids = np.random.default_rng(0).integers(3, 50000, size=(args.batch, 16))
    run = lambda: model.generate(ids, max_new_tokens=args.new, eos_token_id=None)  # noqa: E731
    seconds = best_of(run)
    print(f"generate: {seconds / args.new * 1e3:.2f} ms/token, {args.batch * args.new / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
