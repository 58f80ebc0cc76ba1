"""PyTorch on torch.distributed (issue 13): `torchrun --nproc-per-node 2` workers over gloo against one process.

* Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): every rank's logits equal one process's within
  1e-5 in fp32, greedy and beam ids are equal, each rank holds only its half of every split weight, equal to
  that block of the checkpoint, and `save_pretrained` writes the whole checkpoint back, bit for bit.
* Data-parallel training (`opt_torch.train` under torchrun): 10 steps under FSDP2 and under DDP log the losses of
  one process with the same global batch, and the folder rank 0 writes is the normal full checkpoint, with the
  one-process weights.

This file is also the workers' script: torchrun runs it with `tp` or `train` and a JSON file of arguments, and the
workers write what the test compares into the folder it names. Every launch has a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FP32_ATOL, assert_close_on_real_tokens, sample_batch

NPROC = 2
LAUNCH_TIMEOUT = 240  # seconds for one torchrun launch; a launch takes ~10 s idle
TRAIN_STEPS = 10
# Worst per-step |loss - one-process loss| measured over the 10 steps (2 processes, gloo, CPU, torch 2.13):
# FSDP2 and DDP 3.8e-7 (float32 round-off of the split sums). The tolerance leaves 25x.
LOSS_ATOL = 1e-5
# Worst |weight - one-process weight| after them: 6e-8 (but k_proj's bias, as in test_train_torch); Adam's state 1.5e-8.
WEIGHT_ATOL = 1e-6
# The workers compare with one CPU process: gloo on the CPU even where GPUs exist (NCCL wants a GPU per rank).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch(*program: str) -> None:
    """`torchrun --standalone --nproc-per-node NPROC <program>` (a script and its arguments, or -m module ...)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}", *program]
    env = {**os.environ, **WORKER_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, f"{program} under torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"


def torchrun(tmp_path: Path, mode: str, arguments: dict) -> Path:
    """Runs this file's worker `mode` in NPROC processes under torchrun; returns the folder they wrote."""
    out = tmp_path / f"{mode}_out"
    out.mkdir()
    spec = tmp_path / f"{mode}.json"
    spec.write_text(json.dumps({**arguments, "out": str(out)}))
    launch(__file__, mode, str(spec))
    return out


# ----- tensor parallelism


TP_VARIANTS = ("pre_ln", "post_ln_proj")
TP_HEADS = {  # the other heads, on HF checkpoints that hold them: {head: (class name, output compared)}
    "base": ("OPTModel", "last_hidden_state"),
    "sequence_classification": ("OPTForSequenceClassification", "logits"),
    "question_answering": ("OPTForQuestionAnswering", "start_logits"),
}


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory, hf_checkpoint):
    """({variant or head: folder}, the workers' output folder): one torchrun launch for all of them."""
    folders = {variant: str(hf_checkpoint(variant)[0]) for variant in TP_VARIANTS}
    heads = {head: str(hf_checkpoint("pre_ln", head)[0]) for head in TP_HEADS}
    return {**folders, **heads}, torchrun(tmp_path_factory.mktemp("tp"), "tp", {"folders": folders, "heads": heads})


def one_process_outputs(folder: str) -> dict[str, np.ndarray]:
    import torch

    from opt_torch import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder)
    ids, mask = (torch.from_numpy(x) for x in sample_batch())
    with torch.no_grad():
        logits = model(ids, mask).logits
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    beam = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3)
    return {"logits": logits.numpy(), "greedy": greedy.numpy(), "beam": beam.numpy()}


@pytest.mark.parametrize("variant", TP_VARIANTS)
def test_tensor_parallel_logits_and_ids_equal_one_process(tensor_parallel_run, variant):
    folders, out = tensor_parallel_run
    expected = one_process_outputs(folders[variant])
    _, mask = sample_batch()
    for rank in range(NPROC):
        got = dict(np.load(out / f"{variant}_rank{rank}.npz"))
        diff = assert_close_on_real_tokens(got["logits"], expected["logits"], mask, FP32_ATOL)
        print(f"{variant} rank {rank}: max |logit - one process| on real tokens {diff:.3g}")
        np.testing.assert_array_equal(got["greedy"], expected["greedy"])
        np.testing.assert_array_equal(got["beam"], expected["beam"])


def head_output(head: str, folder: str, ids, mask, tp_plan: str | None = None) -> np.ndarray:
    import torch

    import opt_torch

    class_name, output = TP_HEADS[head]
    model = getattr(opt_torch, class_name).from_pretrained(folder, tp_plan=tp_plan)
    with torch.no_grad():
        return getattr(model(torch.from_numpy(ids), torch.from_numpy(mask)), output).numpy()


@pytest.mark.parametrize("head", list(TP_HEADS))
def test_tensor_parallel_heads_equal_one_process(tensor_parallel_run, head):
    folders, out = tensor_parallel_run
    ids, mask = sample_batch()
    expected = head_output(head, folders[head], ids, mask)
    real = mask if expected.ndim > 2 or head == "question_answering" else np.ones(len(ids))  # pooled: one per row
    for rank in range(NPROC):
        got = np.load(out / f"{head}_rank{rank}.npy")
        assert_close_on_real_tokens(got, expected, real, FP32_ATOL, f"{head} rank {rank}")


def test_each_rank_holds_its_block_of_the_split_weights(tensor_parallel_run):
    from opt_core.safetensors_file import read_safetensors

    folders, out = tensor_parallel_run
    blocks = json.loads((out / "blocks.json").read_text())
    stored = read_safetensors(Path(folders["pre_ln"]) / "model.safetensors")
    for rank in range(NPROC):
        local = dict(np.load(out / f"pre_ln_blocks_rank{rank}.npz"))
        assert set(local) == set(blocks)
        for name, dim in blocks.items():
            whole = stored[name]
            size = whole.shape[dim] // NPROC
            expected = np.take(whole, np.arange(rank * size, (rank + 1) * size), axis=dim)
            np.testing.assert_array_equal(local[name], expected, err_msg=f"rank {rank}: {name}")


def test_a_tensor_parallel_model_saves_the_whole_checkpoint(tensor_parallel_run):
    from opt_core.safetensors_file import read_safetensors

    folders, out = tensor_parallel_run
    for variant in TP_VARIANTS:
        saved, stored = (
            read_safetensors(Path(f) / "model.safetensors") for f in (out / f"{variant}_saved", folders[variant])
        )
        assert set(saved) == set(stored)
        for name, value in saved.items():
            np.testing.assert_array_equal(value, stored[name], err_msg=f"{variant}: {name}")


def tp_worker(arguments: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from opt_torch import OPTForCausalLM

    out, rank = Path(arguments["out"]), int(os.environ["RANK"])
    ids, mask = (torch.from_numpy(x) for x in sample_batch())
    for variant, folder in arguments["folders"].items():
        model = OPTForCausalLM.from_pretrained(folder, tp_plan="auto")
        with torch.no_grad():
            logits = model(ids, mask).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
        beam = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3)
        np.savez(out / f"{variant}_rank{rank}.npz", logits=logits.numpy(), greedy=greedy.numpy(), beam=beam.numpy())
        split = {k: v for k, v in model.state_dict().items() if isinstance(v, DTensor) and v.placements[0].is_shard()}
        np.savez(out / f"{variant}_blocks_rank{rank}.npz", **{k: v.to_local().numpy() for k, v in split.items()})
        if rank == 0:
            blocks = {name: value.placements[0].dim for name, value in split.items()}
            (out / "blocks.json").write_text(json.dumps(blocks))
        model.save_pretrained(out / f"{variant}_saved")  # gathered by every rank, written by rank 0
    for head, folder in arguments["heads"].items():
        np.save(out / f"{head}_rank{rank}.npy", head_output(head, folder, ids.numpy(), mask.numpy(), "auto"))
    dist.destroy_process_group()


# ----- data-parallel training


@pytest.fixture(scope="module")
def training_setup(tmp_path_factory):
    """(files, causal-LM checkpoint folder): text and a BPE tokenizer, HF's tiny OPT of that vocabulary."""
    from test_train_torch import hf_checkpoints, sentence

    from opt_core.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("distributed_data")
    rng = np.random.default_rng(0)
    text = folder / "text.txt"
    text.write_text("\n".join(sentence(rng, int(rng.integers(4, 12))) for _ in range(120)) + "\n")
    train_bpe_tokenizer([text], 320, folder / "tokenizer")
    files = {"causal-lm": text, "tokenizer": folder / "tokenizer"}
    checkpoints = hf_checkpoints(tmp_path_factory, files["tokenizer"], {"causal-lm": "OPTForCausalLM"})
    return files, checkpoints["causal-lm"]


def training_options(files, checkpoint, output: Path, **changes):
    from test_train_torch import task_options

    fields = dict(steps=TRAIN_STEPS, batch_size=4, grad_accum=2, save_every=5, eval_every=5)
    return task_options(files, "causal-lm", output, checkpoint, **{**fields, **changes})


def losses_of(folder: Path) -> list[float]:
    from opt_core.training import LOG_NAME

    records = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]
    return [record["loss"] for record in records if record["event"] == "train"]


@pytest.fixture(scope="module")
def one_process_training(tmp_path_factory, training_setup):
    import torch

    from opt_torch.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = training_options(*training_setup, tmp_path_factory.mktemp("one_process"))
        train(options, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return options.output


@pytest.fixture(scope="module")
def distributed_training(tmp_path_factory, training_setup):
    """{"fsdp": output folder, "ddp": output folder}: one torchrun launch trains both."""
    files, checkpoint = training_setup
    tmp_path = tmp_path_factory.mktemp("distributed")
    runs = {kind: str(tmp_path / kind) for kind in ("fsdp", "ddp")}
    arguments = {"files": {k: str(v) for k, v in files.items()}, "checkpoint": str(checkpoint), "runs": runs}
    torchrun(tmp_path, "train", arguments)
    return {kind: Path(folder) for kind, folder in runs.items()}


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_distributed_training_logs_the_one_process_losses(one_process_training, distributed_training, kind):
    expected, got = losses_of(one_process_training), losses_of(distributed_training[kind])
    assert len(got) == len(expected) == TRAIN_STEPS  # rank 0 alone writes the log
    worst = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
    print(f"{kind}: worst per-step loss difference vs one process over {TRAIN_STEPS} steps: {worst:.3g}")
    assert worst <= LOSS_ATOL


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_distributed_training_writes_the_normal_full_checkpoint(one_process_training, distributed_training, kind):
    from opt_core.safetensors_file import read_safetensors
    from opt_core.training import STATE_NAME
    from opt_torch.train import OPTIMIZER_NAME

    folder = distributed_training[kind]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in one_process_training.iterdir())
    assert json.loads((folder / STATE_NAME).read_text())["step"] == TRAIN_STEPS
    for file in ("model.safetensors", OPTIMIZER_NAME):
        got, expected = read_safetensors(folder / file), read_safetensors(one_process_training / file)
        assert set(got) == set(expected), file
        for name, value in expected.items():
            assert got[name].shape == value.shape, name
            if name.endswith("k_proj.bias"):  # softmax cancels it: Adam scales its rounding-noise gradient to lr
                continue
            np.testing.assert_allclose(got[name], value, atol=WEIGHT_ATOL, err_msg=f"{kind} {file}: {name}")


# ----- opt-lm train under torchrun, resumed (slow: two more launches)


def cli_flags(options) -> list[str]:
    """The `opt-lm train` command line of TrainOptions made by `training_options`."""
    flags = ["train", "--framework", "torch", "--model", str(options.init_from), "--output", str(options.output)]
    flags += ["--train-files", *map(str, options.train_files), "--tokenizer", str(options.tokenizer)]
    for name in ("steps", "batch_size", "grad_accum", "learning_rate", "warmup_steps", "schedule", "weight_decay"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    for name in ("clip_norm", "seq_len", "eval_fraction", "eval_every", "save_every", "log_every", "data_parallel"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    return flags + ["--no-dropout"] + (["--resume"] if options.resume else [])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_opt_lm_train_under_torchrun_resumes_with_the_one_process_losses(tmp_path, training_setup, kind):
    """5 steps, then --resume to 10 (restoring the sharded weights and AdamW state), through the CLI under
    torchrun: the log of one process doing the same."""
    import torch

    from opt_torch.train import train

    first = training_options(*training_setup, tmp_path / "torchrun", steps=5, data_parallel=kind)
    launch("-m", "opt_cli.main", *cli_flags(first))
    launch("-m", "opt_cli.main", *cli_flags(dataclasses.replace(first, steps=TRAIN_STEPS, resume=True)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = dataclasses.replace(first, output=tmp_path / "alone")
        train(alone, device="cpu")
        train(dataclasses.replace(alone, steps=TRAIN_STEPS, resume=True), device="cpu")
    finally:
        torch.set_num_threads(threads)
    expected, got = losses_of(alone.output), losses_of(first.output)
    assert len(got) == len(expected) == TRAIN_STEPS
    worst = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
    print(f"{kind} through opt-lm, resumed at step 5: worst per-step loss difference vs one process {worst:.3g}")
    assert worst <= LOSS_ATOL


def train_worker(arguments: dict) -> None:
    from opt_torch.distributed import init_distributed
    from opt_torch.train import train

    files = {k: Path(v) for k, v in arguments["files"].items()}
    init_distributed()  # once for both runs (train() leaves a group it did not make as it is)
    for kind, output in arguments["runs"].items():
        options = training_options(files, arguments["checkpoint"], Path(output), data_parallel=kind)
        train(options, device="cpu")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    WORKERS = {"tp": tp_worker, "train": train_worker}
    WORKERS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
