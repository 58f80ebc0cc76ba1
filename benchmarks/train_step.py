"""Training-step speed: this project's three trainers against HF transformers + torch.optim.AdamW, in one run.

    python benchmarks/train_step.py [--batch 4] [--seq-len 128] [--steps 10] [--warmup 2]
        [--frameworks hf torch tf flax] [--dtypes fp32 bf16] [--preset opt-125m] [--layers N]
        [--lora-r R [--lora-alpha A] [--lora-target q_proj v_proj] [--modes full lora]] [--forward-steps N]

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

Modes: "full" (the default) trains every weight. "lora" (`--lora-r R`; `--modes full lora` runs both) trains a
LoRA adapter on the frozen model: the project's trainers are built as `opt_core.training.train_with` builds them in
a LoRA run (`TrainOptions(lora_r, lora_alpha, lora_target, init_from)`, and after `build_model`,
`model.add_adapter(options.lora_config(), seed=options.seed)`; each trainer then optimizes only the adapter's
parameters); HF is `peft.get_peft_model(model, peft.LoraConfig(r, lora_alpha, target_modules,
task_type="CAUSAL_LM"))` with torch AdamW over the parameters with requires_grad. PEFT's lora_A tensors are set to
the project's seeded initial values (`opt_core.adapters.init_lora_weights`, the same distribution PEFT draws from;
lora_B is zero in both), so the losses stay comparable after the first update. Each row reports its trainable and
total parameter counts, `model.trainable_parameters()` for the project's models and PEFT's
`get_nb_trainable_parameters()` for HF (which must agree), and the parameter count its optimizer updates.

The batches are `opt_core.data.load_task_data("causal-lm", ...)` rows of text (the embedded model's corpus,
Python's docstrings) tokenized with the embedded model's tokenizer, picked per step by `opt_core.data.
batch_indices` and stacked [1, B, T] as `run_training` does; the rate is `opt_core.training.learning_rate`.

Each framework and dtype runs in its own subprocess (no shared threads or memory), which reports its peak RSS.
"First step s" is the first update (tracing and compilation included); `--warmup` steps (the first included) are
not timed; tokens/s is batch x seq-len / the best timed step (the project's best-of convention); the median is
shown beside it, and the median CPU seconds (all of the process's threads, `time.process_time`) of a step, which
depend less than wall time on what else the machine runs. The parent samples the 1-minute load average every few
seconds while each subprocess runs. HF's rows also split its step into forward (with the loss), backward, and
clipping + AdamW (medians), and `--forward-steps N` times N forward passes without gradients after the training
steps (the trainers' `eval_outputs`, HF's model under `torch.no_grad`; the median), to set a step against its
forward. Peak RSS is read before those forward passes.
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
MODES = ("full", "lora")
LOAD_SAMPLE_S = 5.0  # the parent's load-average sampling period while a subprocess runs


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

    lora = {}
    if spec["mode"] == "lora":
        lora = dict(lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_target=spec["lora_target"])
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
        **lora,
    )


def make_trainer(framework: str, options, hf_optimizer: str):
    """The object whose `train_step(batch, learning_rate, step)` is timed, and the model's (trainable, total)
    parameter counts: `model.trainable_parameters()`, or PEFT's `get_nb_trainable_parameters()` for HF."""
    if framework == "hf":
        trainer = HFTrainer(options, hf_optimizer)
        return trainer, trainer.parameter_count()
    if framework in ("torch", "torch-compile"):
        from opt_torch.train import TorchTrainer, build_model

        model = with_adapter(build_model(options, None, {}), options)
        trainer = TorchTrainer(model, options, device="cpu", compile=framework != "torch")
    elif framework == "tf":
        from opt_tf.train import TFTrainer, build_model

        model = with_adapter(build_model(options, None, {}), options)
        trainer = TFTrainer(model, options)
    elif framework == "flax":
        from opt_flax.train import FlaxTrainer, build_model

        model = with_adapter(build_model(options, None, {}), options)
        trainer = FlaxTrainer(model, options)
    else:
        raise ValueError(f"unknown framework {framework!r}")
    return trainer, tuple(model.trainable_parameters())


def with_adapter(model, options):
    """`opt_core.training.train_with`'s step between `build_model` and the trainer: a LoRA run adds the seeded
    adapter (which freezes the rest)."""
    if options.lora_r is not None:
        model.add_adapter(options.lora_config(), seed=options.seed)
    return model


def optimized_parameters(framework: str, trainer) -> int:
    """How many parameters the trainer's optimizer updates (its own record, not the model's count)."""
    if framework in ("hf", "torch", "torch-compile"):
        return sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    if framework == "tf":
        return sum(int(np.prod(v.shape)) for v in trainer.optimizer._trainable_variables)
    import jax

    mask = trainer.mask or jax.tree.map(lambda _: True, trainer.params)
    leaves = zip(jax.tree.leaves(trainer.params), jax.tree.leaves(mask))
    return sum(int(np.prod(leaf.shape)) for leaf, trained in leaves if trained)


def forward_only(framework: str, trainer, batch: dict[str, np.ndarray]) -> None:
    """One forward pass with the loss and no gradients: the trainer's eval step (HF: under torch.no_grad)."""
    micro_batch = {k: v[0] for k, v in batch.items()}  # [B, ...]
    if framework == "hf":
        trainer.forward_only(micro_batch)
    else:
        trainer.eval_outputs(micro_batch)


class HFTrainer:
    """The anchor: what an HF user's loop does for one update (HF Trainer's optimizer set-up, written out).

    With `options.lora_r`, the model is PEFT's LoRA model over HF's (`peft.get_peft_model`), its lora_A tensors
    set to the project's seeded initial values, and the optimizer holds the parameters with requires_grad (as HF
    Trainer's does). `phases` records each step's forward, backward and clipping + AdamW seconds.

    Args:
        options: the run's options (rates, betas, epsilon, decay, clipping, dtype, LoRA).
        implementation: torch.optim.AdamW's "fused", "foreach" or "for-loop" kernel.
    """

    def __init__(self, options, implementation: str):
        import torch
        import transformers

        self.torch, self.options = torch, options
        no_dropout = dict(dropout=0.0, attention_dropout=0.0)  # HF OPT has no activation dropout
        self.model = transformers.OPTForCausalLM.from_pretrained(options.init_from, dtype=torch.float32, **no_dropout)
        if options.lora_r is not None:
            self.model = peft_model(self.model, options)
        self.model.train()
        # HF Trainer's groups: decay on everything but biases and LayerNorm weights, which in OPT are the 1-D ones
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": options.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        kernel = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
        betas = (options.adam_beta1, options.adam_beta2)
        eps = options.adam_epsilon
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, **kernel[implementation])
        self.bf16 = options.dtype == "bfloat16"
        self.phases: list[tuple[float, float, float]] = []

    def parameter_count(self) -> tuple[int, int]:
        """(trainable, total): PEFT's `get_nb_trainable_parameters()`; without an adapter, the same count of the
        plain model (requires_grad, and every parameter; the tied head's weight once)."""
        if hasattr(self.model, "get_nb_trainable_parameters"):
            return tuple(self.model.get_nb_trainable_parameters())
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def train_step(self, batch: dict[str, np.ndarray], learning_rate: float, step: int) -> float:
        torch = self.torch
        inputs = {k: torch.from_numpy(v[0].astype(np.int64)) for k, v in batch.items()}  # the one micro-batch
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**inputs).loss
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.phases.append((forward_done - start, backward_done - forward_done, time.perf_counter() - backward_done))
        return float(loss)

    def forward_only(self, batch: dict[str, np.ndarray]) -> float:
        torch = self.torch
        inputs = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return float(self.model(**inputs).loss)


def peft_model(model, options):
    """`peft.get_peft_model` with the run's LoRA settings, lora_A set to `opt_core.adapters.init_lora_weights`'
    values (lora_B: zeros in both), so that the losses can be compared after the first update."""
    import peft
    import torch

    from opt_core import OPTConfig
    from opt_core.adapters import init_lora_weights, plan_adapter

    config = peft.LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.lora_config().target_modules,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    plan = plan_adapter(options.lora_config(), OPTConfig.from_pretrained(options.init_from), options.head)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in init_lora_weights(plan, options.seed).items():
            named["base_model.model." + name.replace(".weight", ".default.weight")].copy_(torch.from_numpy(value))
    return model


def run_child(spec: dict) -> dict:
    """Builds the trainer, runs warmup + steps updates over `opt_core.data`'s batches, returns the timings."""
    from opt_core.data import batch_indices
    from opt_core.training import learning_rate

    started = time.perf_counter()
    options = train_options(spec)
    trainer, (trainable, total) = make_trainer(spec["framework"], options, spec["hf_optimizer"])
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
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before any forward-only pass
    forward_times = []
    for _ in range(spec["forward_steps"] + 1 if spec["forward_steps"] else 0):  # the first one compiles
        start = time.perf_counter()
        forward_only(spec["framework"], trainer, batch)
        forward_times.append(time.perf_counter() - start)
    phases = getattr(trainer, "phases", [])[spec["warmup"] :]
    return {
        "setup_s": setup_s,
        "first_step_s": times[0],
        "step_times": times[spec["warmup"] :],
        "step_cpu_times": cpu_times[spec["warmup"] :],
        "losses": losses,
        "peak_rss_bytes": peak_rss,
        "trainable": trainable,
        "total": total,
        "optimized": optimized_parameters(spec["framework"], trainer),
        "phases": phases,
        "forward_times": forward_times[1:],
        "versions": versions(spec["framework"]),
    }


def versions(framework: str) -> dict[str, str]:
    out = {}
    if framework in ("hf", "torch", "torch-compile"):
        import torch

        out["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    if framework == "hf":
        import peft
        import transformers

        out["transformers"], out["peft"] = transformers.__version__, peft.__version__
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
    """Runs `run_child(spec)` in a fresh interpreter; its result, or {"error": ...}, with the 1-minute load
    averages sampled while it ran."""
    result_path = Path(spec["workdir"]) / f"{spec['framework']}-{spec['dtype']}-{spec['mode']}.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, __file__, "--child", json.dumps({**spec, "result": str(result_path)})]
    loads, started = [os.getloadavg()[0]], time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        while True:
            try:
                returncode = child.wait(timeout=LOAD_SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                loads.append(os.getloadavg()[0])
                if time.perf_counter() - started > timeout:
                    child.kill()
                    child.wait()
                    return {"error": f"timed out after {timeout:.0f} s"}
        stderr.seek(0)
        errors = stderr.read()
    loads.append(os.getloadavg()[0])
    if returncode != 0 or not result_path.is_file():
        return {"error": f"exit {returncode}: {errors[-3000:]}"}
    return {**json.loads(result_path.read_text()), "loads": loads}


def summarize(results: list[dict]) -> None:
    """Adds tokens/s, the ratios to HF of the same dtype and mode and to the same framework's full fine-tuning,
    and the loss differences to HF's, in place."""
    for row in results:
        if "error" in row:
            continue
        times = np.asarray(row["step_times"])
        row["best_s"], row["median_s"] = float(times.min()), float(np.median(times))
        row["median_cpu_s"] = float(np.median(row["step_cpu_times"]))
        row["tokens_per_s"] = row["tokens"] / row["best_s"]
        row["median_tokens_per_s"] = row["tokens"] / row["median_s"]
    done = [r for r in results if "error" not in r]
    anchors = {(r["dtype"], r["mode"]): r for r in done if r["framework"] == "hf"}
    full = {(r["framework"], r["dtype"]): r for r in done if r["mode"] == "full"}
    for row in done:
        if row["mode"] != "full" and (row["framework"], row["dtype"]) in full:
            row["ratio_to_full"] = row["tokens_per_s"] / full[row["framework"], row["dtype"]]["tokens_per_s"]
        hf = anchors.get((row["dtype"], row["mode"]))
        if hf is None:
            continue
        row["ratio_to_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
        row["first_loss_diff"] = abs(row["losses"][0] - hf["losses"][0])
        row["last_loss_diff"] = abs(row["losses"][-1] - hf["losses"][-1])


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\ntokens/s = {args.batch} x {args.seq_len} / the best of {args.steps} timed steps (median beside it)\n")
    print(
        "| framework | mode | dtype | first step s | step s best / median | CPU s / step | tokens/s | x HF | "
        f"first loss | loss after {args.warmup + args.steps} steps | peak RSS GiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        name = display_name(row)
        if "error" in row:
            failed = f"failed: {row['error'].splitlines()[-1][:80]}"
            print(f"| {name} | {row['mode']} | {row['dtype']} | {failed} |" + " |" * 7)
            continue
        ratio = f"{row['ratio_to_hf']:.2f}" if "ratio_to_hf" in row else ""
        first, last = f"{row['losses'][0]:.6f}", f"{row['losses'][-1]:.6f}"
        if row["framework"] != "hf" and "first_loss_diff" in row:
            first += f" ({row['first_loss_diff']:.1e})"
            last += f" ({row['last_loss_diff']:.1e})"
        print(
            f"| {name} | {row['mode']} | {row['dtype']} | {row['first_step_s']:.2f} | {row['best_s']:.3f} / "
            f"{row['median_s']:.3f} | {row['median_cpu_s']:.2f} | {row['tokens_per_s']:.0f} | {ratio} | {first} | "
            f"{last} | {row['peak_rss_bytes'] / 2**30:.2f} |"
        )
    print("\n(in brackets: |difference| to HF's loss of the same dtype and mode)")
    print_parameters_table(results)


def display_name(row: dict) -> str:
    if row["framework"] == "hf" and row["mode"] == "lora":
        return "HF transformers + PEFT + torch AdamW"
    return NAMES[row["framework"]]


def print_parameters_table(results: list[dict]) -> None:
    """Trainable parameters against speed and memory; x HF is against HF of the same dtype and mode, x full
    against the same framework's full fine-tuning; the load is the median (min-max) sampled during the row."""
    print(
        "\n| framework | mode | dtype | trainable params | of total | trainable % | optimizer holds | tokens/s | "
        "CPU s / step | peak RSS GiB | x HF same mode | x full | forward-only s | load |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        if "error" in row:
            continue
        ratios = [f"{row[k]:.2f}" if k in row else "" for k in ("ratio_to_hf", "ratio_to_full")]
        forward = f"{np.median(row['forward_times']):.3f}" if row["forward_times"] else ""
        loads = row["loads"]
        print(
            f"| {display_name(row)} | {row['mode']} | {row['dtype']} | {row['trainable']:,d} | "
            f"{row['total']:,d} | {100 * row['trainable'] / row['total']:.4f} | {row['optimized']:,d} | "
            f"{row['tokens_per_s']:.0f} | {row['median_cpu_s']:.2f} | {row['peak_rss_bytes'] / 2**30:.2f} | "
            f"{' | '.join(ratios)} | {forward} | {np.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f}) |"
        )
    for row in results:
        if row.get("phases"):
            forward, backward, update = np.median(np.asarray(row["phases"]), axis=0)
            print(
                f"HF {row['mode']} {row['dtype']}, median of the timed steps: forward {forward:.3f} s, backward "
                f"{backward:.3f} s, clipping + AdamW {update:.3f} s"
            )


def check_losses(results: list[dict]) -> bool:
    """fp32's first-step losses agree with HF's of the same mode (they start from the same weights and batch)."""
    ok = True
    for row in results:
        if row["dtype"] == "fp32" and "first_loss_diff" in row:
            relative = row["first_loss_diff"] / max(1.0, abs(row["losses"][0]))
            if relative > FP32_LOSS_TOLERANCE:
                print(f"WARNING: {row['framework']} {row['mode']} fp32 first-step loss is {relative:.1e} off HF's")
                ok = False
    return ok


def check_parameter_counts(results: list[dict]) -> bool:
    """Every row's (trainable, total) equals HF's (PEFT's count) of the same mode, and its optimizer holds exactly
    the trainable parameters; prints both counts."""
    ok = True
    anchors = {r["mode"]: r for r in results if r["framework"] == "hf" and "error" not in r}
    for row in results:
        if "error" in row:
            continue
        hf = anchors.get(row["mode"])
        counted = (row["trainable"], row["total"])
        print(
            f"{row['framework']} {row['mode']} {row['dtype']}: trainable {counted[0]:,d} of {counted[1]:,d}, the "
            f"optimizer holds {row['optimized']:,d}"
            + (f"; HF/PEFT {hf['trainable']:,d} of {hf['total']:,d}" if hf is not None and hf is not row else "")
        )
        if row["optimized"] != row["trainable"] or (hf is not None and counted != (hf["trainable"], hf["total"])):
            print(f"WARNING: {row['framework']} {row['mode']} {row['dtype']}: the parameter counts disagree")
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
            for mode in args.modes:
                for framework in args.frameworks:
                    spec = dict(framework=framework, dtype=dtype, mode=mode, checkpoint=str(checkpoint),
                                data=str(data), workdir=workdir, batch=args.batch, seq_len=args.seq_len,
                                steps=args.steps, warmup=args.warmup, hf_optimizer=args.hf_optimizer,
                                lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_target=args.lora_target,
                                forward_steps=args.forward_steps)  # fmt: skip
                    started = time.perf_counter()
                    row = {"framework": framework, "dtype": dtype, "mode": mode, "tokens": args.batch * args.seq_len}
                    row.update(spawn(spec, args.timeout))
                    results.append(row)
                    report_progress(row, time.perf_counter() - started)
    return results


def report_progress(row: dict, seconds: float) -> None:
    """One line per subprocess: its timings, losses and the load average around it."""
    if "error" in row:
        print(f"{row['framework']} {row['mode']} {row['dtype']}: FAILED {row['error']}", flush=True)
        return
    steps = " ".join(f"{t:.3f}" for t in row["step_times"])
    cpu = " ".join(f"{t:.2f}" for t in row["step_cpu_times"])
    forward = " ".join(f"{t:.3f}" for t in row["forward_times"])
    losses = " ".join(f"{x:.6f}" for x in row["losses"])
    loads = " ".join(f"{x:.1f}" for x in row["loads"])
    print(
        f"{row['framework']} {row['mode']} {row['dtype']}: {seconds:.0f} s in all, set-up {row['setup_s']:.1f} s, "
        f"first step {row['first_step_s']:.2f} s, steps {steps} (CPU {cpu})"
        + (f", forward only {forward}" if forward else "")
        + f"; losses {losses}; load {loads}; {row['versions']}",
        flush=True,
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
    parser.add_argument("--lora-r", type=int, help="LoRA runs of this rank (`--modes` default: lora)")
    parser.add_argument("--lora-alpha", type=float, default=8, help="LoRA's scaling numerator (PEFT's default 8)")
    parser.add_argument("--lora-target", nargs="+", default=["q_proj", "v_proj"], help="LoRA's target_modules")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: full, or lora with --lora-r")
    parser.add_argument("--forward-steps", type=int, default=0, help="forward-only passes timed after the steps")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per framework and dtype")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step is never timed)")
    if args.modes is None:
        args.modes = ["full"] if args.lora_r is None else ["lora"]
    if "lora" in args.modes and args.lora_r is None:
        parser.error("--modes lora needs --lora-r")
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
        f"{args.hf_optimizer}; modes {' '.join(args.modes)}"
        + (f" (LoRA r={args.lora_r}, alpha {args.lora_alpha:g}, {' '.join(args.lora_target)})" if args.lora_r else ""),
        flush=True,
    )
    results = run_all(args)
    summarize(results)
    print_table(results, args)
    agree = check_losses(results)
    print(f"fp32 first-step losses agree with HF's within {FP32_LOSS_TOLERANCE:.0e} relative: {agree}")
    counts = check_parameter_counts(results)
    print(f"parameter counts agree with HF's (PEFT's) and with what each optimizer holds: {counts}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        flags = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": flags, "results": results}, indent=1))


if __name__ == "__main__":
    main()
