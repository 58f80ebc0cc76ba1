"""Per-token time of TF greedy decode (opt-125m shape, random weights, fp32), for profiling changes quickly.

    python benchmarks/tf_step.py [--batch 1] [--layout rule|copy|stored]

Times (best of several) `generate` with 128 new tokens, as `benchmarks/decode.py` does, without the other
frameworks. `--layout`: the kernels generate decodes with, by its rule (`rule`, the default:
`opt_core.generation.decode_layout_pays`, the [out, in] copy at one row only), or always the copy (`copy`,
`opt_tf.decode_layout`), or always the stored [in, out] kernels (`stored`).
For the compiled HLO: XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text".
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layout", choices=("rule", "copy", "stored"), default="rule")
    args = parser.parse_args()
    import opt_tf
    from opt_core import OPTConfig
    from opt_tf.decode_layout import DecodeLayout

    if args.layout != "rule":
        DecodeLayout.pays = staticmethod(lambda layers, rows: args.layout == "copy")

    model = opt_tf.TFOPTForCausalLM(OPTConfig.from_preset("opt-125m"))
    ids = np.random.default_rng(0).integers(3, 50000, size=(args.batch, 16))
    run = lambda: model.generate(ids, max_new_tokens=args.new, eos_token_id=None)  # noqa: E731
    run()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    print(f"generate: {seconds / args.new * 1e3:.2f} ms/token, {args.batch * args.new / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
