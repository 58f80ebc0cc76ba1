"""Training-step speed: this project's three trainers against HF transformers + torch.optim.AdamW, in one run.

    python benchmarks/train_step.py [--batch 4] [--seq-len 128] [--steps 10] [--warmup 2]
        [--frameworks hf torch tf flax] [--dtypes fp32 bf16] [--preset opt-125m] [--layers N]

One training step is what `opt_core.training.run_training` calls once per update: forward, backward and the AdamW
update (global-norm clipping at 1.0, weight decay 0.1 off biases and LayerNorm weights), causal LM, one
micro-batch of `--batch` rows x `--seq-len` tokens. The model is the preset's shape with random weights, written
once in HF's format and loaded by every framework; dropout is off everywhere, so every framework does the same
arithmetic and the first step's fp32 losses must agree (checked). A random model's first loss is near ln V, so the
last step's loss, printed beside it, is the stronger check: Keras' epsilon placement (`opt_tf/train.py`) moves
TF's by a few 1e-3 after a few updates at opt-125m's vocabulary.

- hf: `transformers.OPTForCausalLM` (its own loss) and `torch.optim.AdamW` with HF Trainer's two param groups and
  its default implementation for this torch (`--hf-optimizer`, "fused" for torch >= 2.8); bf16 is
  `torch.autocast("cpu", torch.bfloat16)` over the forward.
- torch, tf, flax: the project's own trainers (`opt_torch.train.TorchTrainer`, `opt_tf.train.TFTrainer`,
  `opt_flax.train.FlaxTrainer`), built by each framework's `build_model` from `TrainOptions` as `opt-lm train`
  builds them; bf16 is `TrainOptions(dtype="bfloat16")`, the trainers' mixed precision (bf16 compute over float32
  weights and optimizer state). "torch-compile" (not in the default list) is TorchTrainer(compile=True).

The batches are `opt_core.data.load_task_data("causal-lm", ...)` rows of text (the embedded model's corpus,
Python's docstrings) tokenized with the embedded model's tokenizer, picked per step by `opt_core.data.
batch_indices` and stacked [1, B, T] as `run_training` does; the rate is `opt_core.training.learning_rate`.

Each framework and dtype runs in its own subprocess (no shared threads or memory), which reports its peak RSS.
"First step s" is the first update (tracing and compilation included); `--warmup` steps (the first included) are
not timed; tokens/s is batch x seq-len / the best timed step (the project's best-of convention); the median is
shown beside it, and the median CPU seconds (all of the process's threads, `time.process_time`) of a step, which
depend less than wall time on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's packages, in the children too

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
NAMES = {
    "hf": "HF transformers + torch AdamW",
    "torch": "opt_torch TorchTrainer",
    "torch-compile": "opt_torch TorchTrainer, `compile=True`",
    "tf": "opt_tf TFTrainer (XLA)",
    "flax": "opt_flax FlaxTrainer (`jax.jit`)",
}
LEARNING_RATE = 1e-4
FP32_LOSS_TOLERANCE = 1e-4  # relative; measured agreement is ~1e-6 (tests/test_training.py holds 1e-5 over 50 steps)


# ----- set-up, once, in the parent


def model_config(args: argparse.Namespace):
    from opt_core import OPTConfig

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return OPTConfig.from_preset(args.preset, **overrides)


def make_checkpoint(folder: Path, args: argparse.Namespace) -> None:
    """Random weights of the preset's shape in HF's format (float32 safetensors), loaded by every framework."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig.from_dict(model_config(args).to_dict())
    transformers.OPTForCausalLM(config).save_pretrained(folder)


def make_data(path: Path, args: argparse.Namespace) -> int:
    """`opt_core.data`'s causal-LM rows of enough text for every step's distinct rows, saved as .npz; returns
    the number of rows."""
    from opt_cli import corpus
    from opt_cli.main import DEFAULT_MODEL
    from opt_core.data import load_task_data
    from opt_core.tokenizer import OPTTokenizer

    rows = args.batch * (args.warmup + args.steps)
    text = corpus.gather()[: rows * args.seq_len * 8]  # ~3 characters a token: rows to spare
    with tempfile.TemporaryDirectory() as folder:
        text_file = Path(folder) / "corpus.txt"
        text_file.write_text(text, encoding="utf-8")
        tokenizer = OPTTokenizer.from_pretrained(DEFAULT_MODEL)
        data = load_task_data("causal-lm", [text_file], None, tokenizer, seq_len=args.seq_len, eval_fraction=0.0)
    np.savez(path, **data.train)
    return len(data.train["input_ids"])


# ----- one framework and dtype, in a child process


def train_options(spec: dict):
    from opt_core.training import TrainOptions

    return TrainOptions(
        train_files=[spec["data"]],
        output=Path(spec["workdir"]) / "unused",
        init_from=spec["checkpoint"],
        steps=spec["warmup"] + spec["steps"],
        batch_size=spec["batch"],
        seq_len=spec["seq_len"],
        learning_rate=LEARNING_RATE,
        warmup_steps=0,
        schedule="linear",
        dtype=DTYPES[spec["dtype"]],
        dropout=False,
    )


def make_trainer(framework: str, options, hf_optimizer: str):
    """The object whose `train_step(batch, learning_rate, step)` is timed."""
    if framework == "hf":
        return HFTrainer(options, hf_optimizer)
    if framework in ("torch", "torch-compile"):
        from opt_torch.train import TorchTrainer, build_model

        return TorchTrainer(build_model(options, None, {}), options, device="cpu", compile=framework != "torch")
    if framework == "tf":
        from opt_tf.train import TFTrainer, build_model

        return TFTrainer(build_model(options, None, {}), options)
    if framework == "flax":
        from opt_flax.train import FlaxTrainer, build_model

        return FlaxTrainer(build_model(options, None, {}), options)
    raise ValueError(f"unknown framework {framework!r}")


class HFTrainer:
    """The anchor: what an HF user's loop does for one update (HF Trainer's optimizer set-up, written out).

    Args:
        options: the run's options (rates, betas, epsilon, decay, clipping, dtype).
        implementation: torch.optim.AdamW's "fused", "foreach" or "for-loop" kernel.
    """

    def __init__(self, options, implementation: str):
        import torch
        import transformers

        self.torch, self.options = torch, options
        no_dropout = dict(dropout=0.0, attention_dropout=0.0)  # HF OPT has no activation dropout
        self.model = transformers.OPTForCausalLM.from_pretrained(options.init_from, dtype=torch.float32, **no_dropout)
        self.model.train()
        # HF Trainer's groups: decay on everything but biases and LayerNorm weights, which in OPT are the 1-D ones
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": options.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        kernel = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
        betas = (options.adam_beta1, options.adam_beta2)
        eps = options.adam_epsilon
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, **kernel[implementation])
        self.bf16 = options.dtype == "bfloat16"

    def train_step(self, batch: dict[str, np.ndarray], learning_rate: float, step: int) -> float:
        torch = self.torch
        inputs = {k: torch.from_numpy(v[0].astype(np.int64)) for k, v in batch.items()}  # the one micro-batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def run_child(spec: dict) -> dict:
    """Builds the trainer, runs warmup + steps updates over `opt_core.data`'s batches, returns the timings."""
    from opt_core.data import batch_indices
    from opt_core.training import learning_rate

    started = time.perf_counter()
    options = train_options(spec)
    trainer = make_trainer(spec["framework"], options, spec["hf_optimizer"])
    setup_s = time.perf_counter() - started
    rows = dict(np.load(spec["data"]))
    num_rows = len(rows["input_ids"])
    times, cpu_times, losses = [], [], []
    for step in range(options.steps):
        picked = batch_indices(num_rows, options.batch_size, step, options.seed, options.shuffle)
        batch = {k: v[picked].reshape(1, options.batch_size, *v.shape[1:]) for k, v in rows.items()}  # [A=1, B, T]
        rate = learning_rate(step, options)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(float(trainer.train_step(batch, rate, step)))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "setup_s": setup_s,
        "first_step_s": times[0],
        "step_times": times[spec["warmup"] :],
        "step_cpu_times": cpu_times[spec["warmup"] :],
        "losses": losses,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "versions": versions(spec["framework"]),
    }


def versions(framework: str) -> dict[str, str]:
    out = {}
    if framework in ("hf", "torch", "torch-compile"):
        import torch

        out["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    if framework == "hf":
        import transformers

        out["transformers"] = transformers.__version__
    if framework == "tf":
        import keras
        import tensorflow as tf

        out["tensorflow"], out["keras"] = tf.__version__, keras.__version__
    if framework == "flax":
        import flax
        import jax
        import optax

        out["jax"], out["flax"], out["optax"] = jax.__version__, flax.__version__, optax.__version__
    return out


# ----- the parent: one subprocess per framework and dtype, then the table


def spawn(spec: dict, timeout: float) -> dict:
    """Runs `run_child(spec)` in a fresh interpreter; its result, or {"error": ...}."""
    result_path = Path(spec["workdir"]) / f"{spec['framework']}-{spec['dtype']}.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, __file__, "--child", json.dumps({**spec, "result": str(result_path)})]
    load_before = os.getloadavg()[0]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0 or not result_path.is_file():
        return {"error": f"exit {done.returncode}: {done.stderr[-3000:]}"}
    return {**json.loads(result_path.read_text()), "load_before": load_before, "load_after": os.getloadavg()[0]}


def summarize(results: list[dict]) -> None:
    """Adds tokens/s, the ratio to HF of the same dtype, and the loss differences to HF's, in place."""
    for row in results:
        if "error" in row:
            continue
        times = np.asarray(row["step_times"])
        row["best_s"], row["median_s"] = float(times.min()), float(np.median(times))
        row["median_cpu_s"] = float(np.median(row["step_cpu_times"]))
        row["tokens_per_s"] = row["tokens"] / row["best_s"]
        row["median_tokens_per_s"] = row["tokens"] / row["median_s"]
    anchors = {r["dtype"]: r for r in results if r["framework"] == "hf" and "error" not in r}
    for row in results:
        hf = anchors.get(row["dtype"])
        if "error" in row or hf is None:
            continue
        row["ratio_to_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
        row["first_loss_diff"] = abs(row["losses"][0] - hf["losses"][0])
        row["last_loss_diff"] = abs(row["losses"][-1] - hf["losses"][-1])


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\ntokens/s = {args.batch} x {args.seq_len} / the best of {args.steps} timed steps (median beside it)\n")
    print(
        "| framework | dtype | first step s | step s best / median | CPU s / step | tokens/s | x HF | first loss | "
        f"loss after {args.warmup + args.steps} steps | peak RSS GiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        name = NAMES[row["framework"]]
        if "error" in row:
            print(f"| {name} | {row['dtype']} | failed: {row['error'].splitlines()[-1][:80]} | | | | | | | |")
            continue
        ratio = f"{row['ratio_to_hf']:.2f}" if "ratio_to_hf" in row else ""
        first, last = f"{row['losses'][0]:.6f}", f"{row['losses'][-1]:.6f}"
        if row["framework"] != "hf" and "first_loss_diff" in row:
            first += f" ({row['first_loss_diff']:.1e})"
            last += f" ({row['last_loss_diff']:.1e})"
        print(
            f"| {name} | {row['dtype']} | {row['first_step_s']:.2f} | {row['best_s']:.3f} / {row['median_s']:.3f} | "
            f"{row['median_cpu_s']:.2f} | {row['tokens_per_s']:.0f} | {ratio} | {first} | {last} | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} |"
        )
    print("\n(in brackets: |difference| to HF's loss of the same dtype)")


def check_losses(results: list[dict]) -> bool:
    """fp32's first-step losses agree with HF's (they start from the same weights and batch)."""
    ok = True
    for row in results:
        if row["dtype"] == "fp32" and "first_loss_diff" in row:
            relative = row["first_loss_diff"] / max(1.0, abs(row["losses"][0]))
            if relative > FP32_LOSS_TOLERANCE:
                print(f"WARNING: {row['framework']} fp32 first-step loss is {relative:.1e} (relative) off HF's")
                ok = False
    return ok


def run_all(args: argparse.Namespace) -> list[dict]:
    """Writes the checkpoint and the rows once, then runs each dtype and framework in its own subprocess."""
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, data = Path(workdir) / "checkpoint", Path(workdir) / "rows.npz"
        make_checkpoint(checkpoint, args)
        print(f"data: {make_data(data, args)} rows of opt_core.data causal-LM text")
        for dtype in args.dtypes:
            for framework in args.frameworks:
                spec = dict(framework=framework, dtype=dtype, checkpoint=str(checkpoint), data=str(data),
                            workdir=workdir, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                            warmup=args.warmup, hf_optimizer=args.hf_optimizer)  # fmt: skip
                started = time.perf_counter()
                row = {"framework": framework, "dtype": dtype, "tokens": args.batch * args.seq_len}
                row.update(spawn(spec, args.timeout))
                results.append(row)
                report_progress(row, time.perf_counter() - started)
    return results


def report_progress(row: dict, seconds: float) -> None:
    """One line per subprocess: its timings, losses and the load average around it."""
    if "error" in row:
        print(f"{row['framework']} {row['dtype']}: FAILED {row['error']}")
        return
    steps = " ".join(f"{t:.3f}" for t in row["step_times"])
    losses = " ".join(f"{x:.6f}" for x in row["losses"])
    print(
        f"{row['framework']} {row['dtype']}: {seconds:.0f} s in all, set-up {row['setup_s']:.1f} s, first step "
        f"{row['first_step_s']:.2f} s, steps {steps}; losses {losses}; load {row['load_before']:.2f} -> "
        f"{row['load_after']:.2f}; {row['versions']}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first is 'first step s')")
    parser.add_argument("--frameworks", nargs="+", default=["hf", "torch", "tf", "flax"], choices=list(NAMES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--preset", default="opt-125m", help="opt_core.OPTConfig preset of the shape")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (quick checks)")
    kernels = ["fused", "foreach", "for-loop"]
    parser.add_argument("--hf-optimizer", choices=kernels, help="HF's AdamW kernel; default: HF Trainer's")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per framework and dtype")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step is never timed)")
    if args.hf_optimizer is None and not args.child:
        import torch

        # HF TrainingArguments' default optim: "adamw_torch_fused" for torch >= 2.8, else "adamw_torch"
        args.hf_optimizer = "fused" if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 8) else "for-loop"
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(run_child(spec)))
        return
    config = model_config(args)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; shape {args.preset}"
        f"{f' with {args.layers} layers' if args.layers else ''} ({config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size}); batch {args.batch} x {args.seq_len}; HF AdamW "
        f"{args.hf_optimizer}"
    )
    results = run_all(args)
    summarize(results)
    print_table(results, args)
    agree = check_losses(results)
    print(f"fp32 first-step losses agree with HF's within {FP32_LOSS_TOLERANCE:.0e} relative: {agree}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        flags = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": flags, "results": results}, indent=1))


if __name__ == "__main__":
    main()
