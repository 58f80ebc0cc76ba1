"""JAX: `jax.export` of the jitted Flax forward, serialized (StableHLO with its calling convention).

Siblings: `opt_export.onnx` (PyTorch), `opt_export.saved_model` (Keras).

The function exported is `(input_ids, attention_mask) -> logits` with the params closed over, so the weights are
constants of the module and the file is the whole model: `jax.export.deserialize(data).call(ids, mask)` runs it in
any process with jax alone (no flax, no this library). Batch and sequence are symbolic dimensions
(`jax.export.symbolic_shape`), so one export serves every shape; each new shape compiles once in the caller. It is
lowered for CPU, CUDA and TPU alike.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export as jax_export

from opt_core.config import OPTConfig
from opt_export.common import ids_and_mask, logits
from opt_flax import FlaxOPTForCausalLM

MODEL_FILE = "model.jax_exported"
# Lowered for every JAX backend, so the one file runs where its user's jax does (the caller picks at `call`).
PLATFORMS = ("cpu", "cuda", "tpu")


def exported_forward(model_folder: Path, platforms: tuple[str, ...] = PLATFORMS) -> jax_export.Exported:
    """The jitted forward of the model at `model_folder`, exported for symbolic B T int32 ids and mask."""
    model = FlaxOPTForCausalLM.from_pretrained(model_folder)
    params = model.params

    def forward(input_ids, attention_mask):
        return model(input_ids, attention_mask, params=params).logits  # B T V

    batch, length = jax_export.symbolic_shape("batch_size, sequence_length")
    spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax_export.export(jax.jit(forward), platforms=platforms)(spec, spec)


def export_stablehlo(model_folder: Path, config: OPTConfig, out: Path) -> dict:
    """Writes `out/model.jax_exported` (`Exported.serialize()`); returns the description `export.json` holds."""
    exported = exported_forward(model_folder)
    (out / MODEL_FILE).write_bytes(exported.serialize())
    return {
        "file": MODEL_FILE,
        "exported_from": f"Flax on JAX {jax.__version__} (jax.export of the jitted forward)",
        "runtime": "jax (jax.export.deserialize)",
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "inputs": ids_and_mask("int32"),
        "outputs": [logits(config.vocab_size)],
        "usage": "Left-pad a batch; logits at padded positions are not meaningful.",
        "run": (
            "import jax; forward = jax.export.deserialize(open('model.jax_exported', 'rb').read()); "
            "logits = forward.call(ids, mask)"
        ),
    }
