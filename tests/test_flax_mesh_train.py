"""Flax training and generation on a device mesh (`TrainOptions.mesh`, `opt-lm train --mesh`) equal one device's.

XLA fixes the device count when JAX starts, so the mesh runs in a fresh interpreter with 8 forced host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), as tests/test_flax_mesh.py does. In it the same seeded
model trains on the same batches on one device and on "data=4,model=2" (params, optimizer state and batch
sharded), dropout and two accumulated micro-batches on; then a checkpoint saved on that mesh resumes on
"data=2,model=4"; a LoRA run trains on the mesh; and the trained model generates on the mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flax")

REPO = Path(__file__).resolve().parents[1]

# Measured (2 CPU cores shared with other jobs, 8 forced host devices, 6 steps of two micro-batches, losses ~4.6):
# the worst per-step loss difference between one device and "data=4,model=2" was 9.5e-7 (the eval loss 3.5e-7), the
# same for the run resumed on "data=2,model=4" and for LoRA; the weights after 6 steps were 5.8e-6 apart, and the
# checkpoint saved on the mesh loads bit-equal to the mesh's weights. Float32 sums in another order (each shard sums
# its rows, then the all-reduce adds the shards), so not bit-equal; Adam divides by sqrt(v), so a weight whose
# gradient is mostly round-off moves by up to a learning rate (1e-2 here) either way: the weights drift more than
# the losses. Tolerances: 1e-5 on losses (10x), 3e-5 on weights (5x).
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 3e-5

SCRIPT = """
import dataclasses, json, sys, time
from pathlib import Path
import jax, numpy as np

jax.config.update("jax_default_matmul_precision", "highest")
from opt_core.adapters import LoraConfig
from opt_core.config import OPTConfig
from opt_core.training import LOG_NAME, TextRows, TrainOptions, run_training
from opt_flax import FlaxOPTForCausalLM
from opt_flax.sharding import make_mesh, shard_params
from opt_flax.train import FlaxTrainer

assert jax.device_count() == 8, jax.devices()
folder, PART = Path(sys.argv[1]), sys.argv[2]
CONFIG = OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                   max_position_embeddings=40, dropout=0.1, pad_token_id=1, bos_token_id=2, eos_token_id=2)
rng = np.random.default_rng(0)
ids = rng.integers(3, 101, size=(40, 12)).astype(np.int32)
ids[:, 0] = 2
rows = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
DATA = TextRows("causal-lm", rows, {k: v[:8] for k, v in rows.items()}, {})


def options(name, **changes):
    fields = dict(steps=6, batch_size=4, grad_accum=2, warmup_steps=2, learning_rate=1e-2, save_every=3,
                  eval_every=3, log_every=1, clip_norm=0.5)
    return TrainOptions([], folder / name, **{**fields, **changes})


def run(opts, lora=False):
    model = FlaxOPTForCausalLM(CONFIG, seed=0)
    if lora:
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    trainer = FlaxTrainer(model, opts)
    run_training(opts, DATA, trainer, {})
    log = [json.loads(line) for line in (opts.output / LOG_NAME).read_text().splitlines()]
    return trainer, [r["loss"] for r in log if r["event"] == "train"], [r["eval_loss"] for r in log if "eval_loss" in r]


def loss_gap(a, b):
    assert len(a) == len(b) and a and b, (a, b)
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def weight_gap(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)


report, T0 = {}, time.time()


def tick(name):  # seconds per part, for the report
    global T0
    report["seconds_" + name], T0 = round(time.time() - T0, 1), time.time()


single, single_losses, single_evals = run(options("one"))
if PART == "fast":
    meshed, mesh_losses, mesh_evals = run(options("mesh", mesh="data=4,model=2"))
    kernel = meshed.params["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model"), kernel.sharding
    assert len(kernel.sharding.device_set) == 8
    adam = next(s for s in jax.tree.leaves(meshed.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
    assert adam.mu["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"].sharding == kernel.sharding  # as its param
    report["loss"] = loss_gap(single_losses, mesh_losses)
    report["eval_loss"] = loss_gap(single_evals, mesh_evals)
    report["weights"] = weight_gap(single.params, meshed.params)
    tick("runs")
    # The mesh's checkpoint is the normal full one: it loads unsharded, with the mesh run's weights.
    report["loaded"] = weight_gap(FlaxOPTForCausalLM.from_pretrained(folder / "mesh").params, meshed.params)
    generations = {"greedy": {}}
else:
    # Resumed on another mesh from a checkpoint saved on the first (at step 3): the losses of the whole run.
    first = options("resumed", mesh="data=4,model=2", steps=3)
    run(first)
    _, resumed_losses, _ = run(dataclasses.replace(first, steps=6, resume=True, mesh="data=2,model=4"))
    report["resumed"] = loss_gap(single_losses, resumed_losses)
    tick("resume")
    # LoRA on the mesh: the adapter's leaves follow their kernels.
    _, lora_single, _ = run(options("lora_one"), lora=True)
    _, lora_meshed, _ = run(options("lora_mesh", mesh="data=4,model=2"), lora=True)
    report["lora"] = loss_gap(lora_single, lora_meshed)
    tick("lora")
    meshed = single
    meshed.model.params = shard_params(jax.device_get(single.params), make_mesh(model=2), CONFIG)
    generations = {"sampled": dict(do_sample=True, top_k=20, seed=3)}

# Generation with the trained params on the mesh equals one device's.
prompts = ids[:4, :5]
for name, flags in generations.items():
    expected = single.model.generate(prompts, max_new_tokens=12, params=jax.device_get(single.params), **flags)
    on_mesh = meshed.model.generate(prompts, max_new_tokens=12, **flags)  # meshed.model.params: on the mesh
    assert np.array_equal(expected, on_mesh), (name, expected, on_mesh)
    report[name + "_new_tokens"] = int(expected.shape[1] - prompts.shape[1])
    tick(name)
print("REPORT " + json.dumps(report))
"""


def run_script(folder: Path, part: str) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-c", textwrap.dedent(SCRIPT), str(folder), part]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    print(report)
    return report


def test_training_and_greedy_generate_on_a_mesh_equal_one_device(tmp_path):
    report = run_script(tmp_path, "fast")
    assert report["loss"] <= LOSS_ATOL and report["eval_loss"] <= LOSS_ATOL, report
    assert report["weights"] <= WEIGHT_ATOL and report["loaded"] == 0.0, report
    assert report["greedy_new_tokens"] == 12


@pytest.mark.slow
def test_resume_on_another_mesh_lora_and_sampling_equal_one_device(tmp_path):
    report = run_script(tmp_path, "slow")
    assert report["resumed"] <= LOSS_ATOL and report["lora"] <= LOSS_ATOL, report
    assert report["sampled_new_tokens"] == 12


@pytest.mark.slow
def test_the_command_line_mesh_equals_one_device(tmp_path):
    """`opt-lm train --framework flax --mesh data=4,model=2` as README.md writes it, on 8 forced host devices."""
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"the quick {i} fox jumps over the lazy dog {i * 7 % 13}." for i in range(300)))
    losses = {}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "data=4,model=2"])):
        command = ["opt-lm", "train", "--framework", "flax", "--model", "default", "--train-files", str(text)]
        command += ["--output", str(tmp_path / name), "--steps", "6", "--batch-size", "4", "--seq-len", "16"]
        command += ["--log-every", "1", "--warmup-steps", "2", "--no-dropout", *mesh]
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
        log = [json.loads(line) for line in (tmp_path / name / "training_log.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in log if r["event"] == "train"]
    assert len(losses["one"]) == 6
    worst = max(abs(a - b) for a, b in zip(losses["one"], losses["mesh"]))
    print(f"worst per-step loss difference, one device vs data=4,model=2: {worst:.3g}")
    assert worst <= LOSS_ATOL, losses


# ----- bad meshes: ConfigErrors naming the value (one device is enough to check them)


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ("data=4,batch=2", "mesh 'data=4,batch=2' has an unknown axis 'batch'"),
        ("data=2,data=2", "repeats 'data'"),
        ("model=0", "the size of 'model' must be an integer >= 1, got '0'"),
        ("data=two", "got 'two'"),
    ],
)
def test_a_malformed_mesh_is_refused_by_the_options(tmp_path, mesh, message):
    from opt_core.errors import ConfigError
    from opt_core.training import TrainOptions

    with pytest.raises(ConfigError, match=message):
        TrainOptions([], tmp_path, mesh=mesh)


def test_a_mesh_the_devices_or_the_model_cannot_take_is_refused(tmp_path):
    import jax

    from opt_core.config import OPTConfig
    from opt_core.errors import ConfigError
    from opt_core.training import TrainOptions
    from opt_flax.sharding import checked_mesh
    from opt_flax.train import training_mesh

    config = OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=48)
    with pytest.raises(ConfigError, match=f"mesh data=2,model=4 needs 8 devices; jax has {jax.device_count()}"):
        training_mesh(TrainOptions([], tmp_path, mesh="data=2,model=4", batch_size=4), config)
    eight = [jax.devices()[0]] * 8  # the checks come before a mesh is made of them
    with pytest.raises(ConfigError, match=r"mesh model=8 must divide the config's num_attention_heads \(4\)"):
        checked_mesh({"data": 1, "model": 8}, config, devices=eight)
    with pytest.raises(ConfigError, match=r"mesh model=8 must divide the config's ffn_dim \(36\)"):
        checked_mesh({"data": 1, "model": 8}, config.replace(num_attention_heads=8, ffn_dim=36), devices=eight)
    with pytest.raises(ConfigError, match=r"batch_size 6 must be a multiple of the mesh's data axis \(4\)"):
        training_mesh(TrainOptions([], tmp_path, mesh="data=4,model=2", batch_size=6), config)
