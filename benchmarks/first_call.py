"""Where the first `generate` call's time goes, per framework, in a fresh process with a cold and then a warm
on-disk compile cache.

    python benchmarks/first_call.py [--frameworks torch torch-compile tf flax] [--new-tokens 128] [--prompt 16]

opt-125m's shape with random weights in fp32 (`decode.py`'s checkpoint), batch 1, greedy, eos disabled. Each row is
its own Python process, started twice on one new cache folder: "cold" finds it empty, "warm" finds what the first
process left (inductor's FX-graph and AOTAutograd caches for torch, JAX's persistent compilation cache for Flax,
TensorFlow's XLA cache, which `opt_tf` keeps only when OPT_LM_COMPILE_CACHE names a folder, as here).

Columns: the import and `from_pretrained` time; the first call; the same call again (the decoding itself, nothing
compiled); their difference, which is what compiling costs the user; and where that went, from each framework's
own accounting:
  torch-compile: dynamo's whole compile (`torch._dynamo.utils.compile_times`: `_compile.compile_inner`), of which
      bytecode tracing and the backend (AOTAutograd and Inductor, or their cache loads);
  tf: the Python trace of the decode program (`opt_tf.generation.TRACE_SECONDS`); the rest of the difference is
      XLA compiling (or loading) it;
  flax: JAX's trace to a jaxpr, its lowering to MLIR, and XLA's backend compile (`jax.monitoring` events; a cache
      hit is a load, reported as compile).
To time an older checkout with this script, put it first on the path: `PYTHONPATH=/path/to/old python
benchmarks/first_call.py` (the processes import `opt_*` from there; its TF rows then show no trace time).

A last line times `import torch._dynamo, torch._inductor.compile_fx` alone in a fresh process: torch pays it at the
first `compile=True` call, inside the first call's time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _child(framework: str, folder: Path, prompt: int, new_tokens: int) -> dict:
    """Runs in the fresh process: load, first call, second call, and the framework's own phase times."""
    start = time.perf_counter()
    phases: collections.Counter = collections.Counter()
    if framework == "flax":
        import jax

        events = {
            "/jax/core/compile/jaxpr_trace_duration": "trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
            "/jax/core/compile/backend_compile_duration": "compile",
        }

        def record(event, seconds, **kwargs):
            if event in events:
                phases[events[event]] += seconds

        jax.monitoring.register_event_duration_secs_listener(record)
    sys.path.insert(0, str(HERE))
    import decode

    generate = decode.runner(framework, folder)
    loaded = time.perf_counter() - start
    ids = np.random.default_rng(1).integers(3, 50000, size=(1, prompt)).astype(np.int64)
    first = decode._timed(lambda: generate(ids, new_tokens))
    again = decode._timed(lambda: generate(ids, new_tokens))
    if framework == "torch-compile":
        import torch._dynamo.utils

        names, seconds = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
        totals = dict(zip(names, seconds))
        for name, key in (
            ("_compile.compile_inner", "compile"),
            ("bytecode_tracing", "trace"),
            ("OutputGraph.call_user_compiler", "backend"),
        ):
            phases[key] = float(totals.get(name, 0.0))
    if framework == "tf":
        from opt_tf import generation

        phases["trace"] = sum(getattr(generation, "TRACE_SECONDS", {}).values())  # absent before it was added
    return {"load_s": loaded, "first_s": first, "again_s": again, "phases": dict(phases)}


def _run_child(framework: str, folder: Path, cache: Path, args) -> dict:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "OPT_LM_COMPILE_CACHE": str(cache / "opt-lm"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    command = [sys.executable, __file__, "--child", framework, "--folder", str(folder)]
    command += ["--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{framework}: the child process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _import_seconds() -> float:
    code = (
        "import time, torch; s = time.perf_counter(); import torch._dynamo, torch._inductor.compile_fx; "
        "print(time.perf_counter() - s)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _phases_text(phases: dict) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=["torch", "torch-compile", "tf", "flax"])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.folder, args.prompt, args.new_tokens)))
        return

    sys.path.insert(0, str(HERE))
    import decode

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        decode.make_checkpoint(folder)
        for framework in args.frameworks:
            cache = Path(tmp) / f"cache-{framework}"
            for state in ("cold", "warm"):
                result = _run_child(framework, folder, cache, args)
                rows.append({"framework": framework, "cache": state, **result})
                print(f"{framework} {state}: done", file=sys.stderr)
    imports = _import_seconds() if "torch-compile" in args.frameworks else None

    print(f"\n{'framework':<15}{'cache':>6}{'load s':>8}{'first s':>9}{'again s':>9}{'first-again':>13}  phases s")
    for row in rows:
        print(
            f"{row['framework']:<15}{row['cache']:>6}{row['load_s']:>8.2f}{row['first_s']:>9.2f}{row['again_s']:>9.2f}"
            f"{row['first_s'] - row['again_s']:>13.2f}  {_phases_text(row['phases'])}"
        )
    if imports is not None:
        print(f"\nimport torch._dynamo, torch._inductor.compile_fx in a fresh process: {imports:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "compiler_import_s": imports}, indent=1))


if __name__ == "__main__":
    main()
