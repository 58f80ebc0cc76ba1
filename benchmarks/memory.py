"""Peak resident memory while loading: this project's three frameworks and HF transformers, in one run.

    python benchmarks/memory.py [--shape opt-1.3b] [--file-dtypes float32 float16] [--dtype auto]
                                [--frameworks torch tf flax hf] [--folder DIR] [--new-tokens N]

Writes a random checkpoint of `--shape` (an `OPTConfig` preset) once per file dtype into a temporary folder (or
`--folder`, kept for later runs), as `save_pretrained` writes it (safetensors, sharded above 5 GB). Then, for each
framework and file dtype, a fresh process imports the framework, loads the folder with `from_pretrained(folder,
dtype=...)` ("auto": the file's dtype; "default": each library's default, float32) and runs one forward of 8 tokens.
The peak resident set (Linux VmHWM, reset after the imports through /proc/self/clear_refs; elsewhere the process'
ru_maxrss) is measured from the imports on, so the table shows what loading and the first forward add:

    framework | file dtype | load dtype | weights | peak during load | after first forward | ratios to the weights

"weights" is the size of the parameters in the loaded dtype (the tied LM head once). Memory the OS keeps in its page
cache is not resident in the process and is not counted; pages of a memory-mapped file the process touches are.

`--new-tokens N` then generates N greedy tokens and adds their time and the peak after them: the demonstration of a
checkpoint larger than memory (`--shape opt-13b --file-dtypes float16 --frameworks torch --new-tokens 3`: 26 GB of
fp16 weights, served from the page cache and the disk).

`--measure FRAMEWORK FOLDER` is the child process (prints one JSON line); tests/test_memory.py uses it too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAMEWORKS = ("torch", "tf", "flax", "hf")
GIB = 2**30


# ----- the child: one framework, one load, one forward


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux) in bytes; None elsewhere."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":")), None)


def peak_rss_bytes() -> int:
    """The process' peak resident set since the last `reset_peak_rss` (or its start)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> int:
    current = _proc_status_bytes("VmRSS")
    return peak_rss_bytes() if current is None else current


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the imports' own peak does not hide the load's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _loader(framework: str):
    """(from_pretrained, forward(model, ids)) of a framework, imported now (before the baseline is taken)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    if framework == "torch":
        import torch

        from opt_torch import OPTForCausalLM

        return OPTForCausalLM.from_pretrained, lambda m, ids: m(input_ids=torch.from_numpy(ids)).logits.sum()
    if framework == "hf":
        import torch
        import transformers

        return transformers.OPTForCausalLM.from_pretrained, lambda m, ids: m(input_ids=torch.from_numpy(ids))
    if framework == "tf":
        from opt_tf import TFOPTForCausalLM

        return TFOPTForCausalLM.from_pretrained, lambda m, ids: np.asarray(m(ids).logits)
    if framework == "flax":
        from opt_flax import FlaxOPTForCausalLM

        return FlaxOPTForCausalLM.from_pretrained, lambda m, ids: np.asarray(m(ids).logits)
    raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")


def _dtype_options(framework: str, dtype: str) -> dict:
    if dtype == "default":
        return {"dtype": "float32"} if framework == "hf" else {}  # HF 5 defaults to "auto"; ours to float32
    return {"dtype": dtype, "param_dtype": dtype} if framework == "flax" else {"dtype": dtype}


def measure(framework: str, folder: str, dtype: str = "auto", forward: bool = True, new_tokens: int = 0) -> dict:
    """Peak RSS growth (bytes) of one process while loading `folder`, during a first forward, and while
    generating `new_tokens` greedy tokens after it."""
    import numpy as np

    from_pretrained, run_forward = _loader(framework)
    with torch_no_grad(framework):
        baseline = current_rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        model = from_pretrained(folder, **_dtype_options(framework, dtype))
        result = {"load_s": time.perf_counter() - start, "load": peak_rss_bytes() - baseline}
        if forward:
            run_forward(model, np.arange(4, 12, dtype=np.int32)[None])
            result["forward"] = peak_rss_bytes() - baseline
        if new_tokens:
            start = time.perf_counter()
            model.generate(_generate_input(framework), max_new_tokens=new_tokens, do_sample=False)
            result["generate_s"] = time.perf_counter() - start
            result["generate"] = peak_rss_bytes() - baseline
    return result


def _generate_input(framework: str):
    import numpy as np

    ids = np.array([[2, 100, 200, 300]], dtype=np.int64)
    if framework in ("torch", "hf"):
        import torch

        return torch.from_numpy(ids)
    return ids


def torch_no_grad(framework: str):
    """torch.no_grad() for the torch-based rows (inference, as HF's generate runs); a no-op elsewhere."""
    if framework in ("torch", "hf"):
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def measure_in_subprocess(framework: str, folder: Path, dtype: str, forward: bool = True, new_tokens: int = 0) -> dict:
    """`measure` in a fresh Python process (nothing loaded before: the peak is this load's alone)."""
    command = [sys.executable, __file__, "--measure", framework, str(folder), "--dtype", dtype]
    command += ["--new-tokens", str(new_tokens)] + (["--no-forward"] if not forward else [])
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} on {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- the parent: checkpoints, runs, table


def write_random_checkpoint(folder: Path, shape: str, file_dtype: str) -> Path:
    """A random `shape` causal LM saved in `file_dtype` safetensors, one tensor drawn at a time; kept if present."""
    if (folder / "config.json").is_file():
        return folder
    import numpy as np

    from opt_core import OPTConfig
    from opt_core.lazy import LazyTensor
    from opt_core.pretrained import save_pretrained
    from opt_core.weights import fresh_parameter, parameter_specs

    config = OPTConfig.from_preset(shape)
    rng = np.random.default_rng(0)
    canonical = {
        spec.name: LazyTensor(spec.shape, np.float32, lambda spec=spec: fresh_parameter(spec, config, rng), spec.name)
        for spec in parameter_specs(config, "causal_lm")
    }
    save_pretrained(
        folder, canonical, config, "causal_lm", architecture="OPTForCausalLM", generation_config=None,
        fmt="safetensors", dtype=file_dtype,
    )  # fmt: skip
    return folder


def weights_bytes(folder: Path, file_dtype: str, dtype: str) -> int:
    """The parameters' size (the tied head once) in the dtype the model loads in."""
    from opt_core.config import OPTConfig
    from opt_core.dtypes import to_numpy_dtype
    from opt_core.weights import parameter_specs

    config = OPTConfig.from_pretrained(folder)
    count = sum(math.prod(spec.shape) for spec in parameter_specs(config, "causal_lm"))
    loaded = {"auto": file_dtype, "default": "float32"}.get(dtype, dtype)
    return count * to_numpy_dtype(loaded).itemsize


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="opt-memory-") as scratch:
        root = Path(args.folder) if args.folder else Path(scratch)
        for file_dtype in args.file_dtypes:
            folder = write_random_checkpoint(root / f"{args.shape}-{file_dtype}", args.shape, file_dtype)
            weights = weights_bytes(folder, file_dtype, args.dtype)
            for framework in args.frameworks:
                found = measure_in_subprocess(framework, folder, args.dtype, new_tokens=args.new_tokens)
                rows.append({"framework": framework, "file_dtype": file_dtype, "weights": weights, **found})
                print_row(rows[-1], args.dtype)
    return rows


def print_header(args: argparse.Namespace) -> None:
    columns = ["framework", "file dtype", "weights GiB", "load s", "peak in load GiB (x weights)"]
    columns.append("after 1st forward GiB (x)")
    generated = ""
    if args.new_tokens:
        generated = f", then {args.new_tokens} greedy tokens"
        columns += [f"{args.new_tokens} tokens", "after them GiB (x)"]
    print(f"# {args.shape}, from_pretrained(folder, dtype={args.dtype!r}) then one forward of 8 tokens{generated}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def print_row(row: dict, dtype: str) -> None:
    weights = row["weights"]
    cells = [
        row["framework"],
        row["file_dtype"],
        f"{weights / GIB:.2f}",
        f"{row['load_s']:.1f}",
        f"{row['load'] / GIB:.2f} ({row['load'] / weights:.2f}x)",
        f"{row['forward'] / GIB:.2f} ({row['forward'] / weights:.2f}x)",
    ]
    if "generate" in row:
        cells += [f"{row['generate_s']:.1f} s", f"{row['generate'] / GIB:.2f} ({row['generate'] / weights:.2f}x)"]
    print("| " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="opt-1.3b", help="an OPTConfig preset (opt-125m, opt-350m, opt-1.3b, ...)")
    parser.add_argument("--file-dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--dtype", default="auto", help='"auto" (the file\'s dtype), "default" (float32), or a dtype')
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--folder", help="keep the checkpoints here (reused when present) instead of a temp folder")
    parser.add_argument("--new-tokens", type=int, default=0, help="also generate this many greedy tokens")
    parser.add_argument("--measure", nargs=2, metavar=("FRAMEWORK", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--no-forward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        found = measure(*args.measure, dtype=args.dtype, forward=not args.no_forward, new_tokens=args.new_tokens)
        print(json.dumps(found))
        return
    print_header(args)
    run(args)


if __name__ == "__main__":
    main()
