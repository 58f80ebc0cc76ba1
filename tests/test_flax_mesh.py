"""opt_flax sharded over a device mesh (8 forced CPU host devices, in a subprocess) equals the single-device model.

XLA fixes the device count when JAX starts, so the mesh runs in a fresh interpreter with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`: a 2 (data) x 4 (model) mesh, as on a TPU slice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flax")

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, tempfile
import jax, numpy as np
from jax.sharding import PartitionSpec as P

jax.config.update("jax_default_matmul_precision", "highest")
from opt_core.weights import parameter_specs
from opt_flax import FlaxOPTForCausalLM, OPTConfig
from opt_flax.pretrained import params_from_canonical
from opt_flax.sharding import batch_sharding, make_mesh, partition_specs, shard_cache, shard_params

assert jax.device_count() == 8, jax.devices()
mesh = make_mesh(model=4)  # 2 data x 4 model
assert dict(mesh.shape) == {"data": 2, "model": 4}
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=40)
rng = np.random.default_rng(0)
ids = rng.integers(3, 128, size=(4, 8)).astype(np.int32)
mask = np.ones((4, 8), np.int32)
mask[1, :3] = mask[3, :5] = 0  # left padding
on_batch = batch_sharding(mesh)
worst = 0.0
for extra in ({}, dict(do_layer_norm_before=False, word_embed_proj_dim=16, tie_word_embeddings=False)):
    config = OPTConfig(**TINY, **extra)
    model = FlaxOPTForCausalLM(config, _do_init=False)
    canonical = {s.name: rng.normal(0, 0.1, s.shape).astype(np.float32) + (s.kind == "norm_scale")
                 for s in parameter_specs(config, "causal_lm")}
    params = params_from_canonical(canonical, config, "causal_lm")
    forward = jax.jit(model.__call__)
    single = np.asarray(forward(ids, mask, params=params).logits)

    sharded = shard_params(params, mesh, config)
    layer = sharded["model"]["decoder"]["layers"]["0"]
    specs = partition_specs(config, mesh=mesh)
    assert specs["model"]["decoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] == P(None, "model")
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "model")  # heads: column parallel
    assert layer["self_attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape == (32, 8)
    assert layer["self_attn"]["out_proj"]["kernel"].sharding.spec == P("model", None)  # row parallel
    assert layer["fc1"]["kernel"].sharding.spec == P(None, "model")  # FFN units: column parallel
    assert layer["fc2"]["kernel"].sharding.spec == P("model", None)  # row parallel
    assert layer["fc1"]["bias"].sharding.spec == P("model") and layer["fc2"]["bias"].sharding.spec == P()
    embed = sharded["model"]["decoder"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec == P("model", None) and embed.addressable_shards[0].data.shape[0] == 32  # vocab
    if "lm_head" in sharded:
        assert sharded["lm_head"]["kernel"].sharding.spec == P(None, "model")

    out = forward(jax.device_put(ids, on_batch), jax.device_put(mask, on_batch), params=sharded).logits
    assert len(out.sharding.device_set) == 8
    real = mask.astype(bool)
    worst = max(worst, float(np.abs(np.asarray(out)[real] - single[real]).max()))

    # Loading straight onto the mesh: each param lands on its shards, the values bit-equal.
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder, params)
    loaded = FlaxOPTForCausalLM.from_pretrained(folder, mesh=mesh)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded.params)[0], jax.tree.leaves(sharded)):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b)), path

# Cached decoding on the mesh: the cache split over batch and heads, prefill then one jitted step.
cache = shard_cache(model.init_cache(4, 8), mesh, config)
assert cache.key_values[0][0].sharding.spec == P("data", None, "model", None)
prefill = forward(ids[:, :7], mask, params=sharded, past_key_values=cache)
step = forward(ids[:, 7:], mask, params=sharded, past_key_values=prefill.past_key_values)
cached = np.concatenate([np.asarray(prefill.logits), np.asarray(step.logits)], axis=1)
worst = max(worst, float(np.abs(cached[real] - single[real]).max()))
assert worst < 1e-5, worst
print(f"worst |sharded - single device| = {worst:.3g}")
"""


def test_sharded_jitted_forward_equals_single_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worst |sharded - single device|" in result.stdout
