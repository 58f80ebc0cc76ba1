"""ONNX from PyTorch: `torch.onnx.export` (the dynamo exporter) of one forward with past keys and values.

Siblings: `opt_export.saved_model` (Keras), `opt_export.stablehlo` (Flax). The graph is HF Optimum's
decoder-with-past for OPT, so ONNX Runtime users (and Optimum's `ORTModelForCausalLM`) step it as they step
Optimum's export: inputs `input_ids`, `attention_mask` (over past + new tokens), `position_ids`,
`past_key_values.{i}.key` / `.value`; outputs `logits`, `present.{i}.key` / `.value`. Keys and values are HF's
B N S H. Batch, sequence and past length are dynamic axes; the first step passes past tensors of length 0.

Attention is the eager path (`masked_softmax`: a select with a finite fill, zero probabilities for a padded
query), not SDPA: a fully masked row stays finite in every ONNX kernel, so a left-padded batch never feeds NaN
keys and values into the next step.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir
import torch

from opt_core.config import OPTConfig
from opt_export.common import ids_and_mask, logits, tensor
from opt_torch import OPTForCausalLM

DEFAULT_OPSET = 18  # the dynamo exporter's lowest; ONNX Runtime 1.18 and later run it
MODEL_FILE = "model.onnx"
KEY_VALUE = ("key", "value")


class DecoderWithPast(torch.nn.Module):
    """OPTForCausalLM as one tensor-in, tensor-out forward: (ids, mask, positions, past...) -> (logits, present...).

    Args:
        model: the causal LM, in eval mode.
    """

    def __init__(self, model: OPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        decoder = self.model.model.decoder
        # validate=False: the export traces symbolic shapes; the runtime gets what the caller feeds it
        out = decoder(input_ids, attention_mask, position_ids, tuple(past_key_values), use_cache=True, validate=False)
        return self.model.lm_head(out.last_hidden_state), out.past_key_values  # B T V, per layer (k, v) B N S H


def input_names(layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in KEY_VALUE]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(layers: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kind}" for i in range(layers) for kind in KEY_VALUE)]


def example_inputs(config: OPTConfig, batch: int = 2, length: int = 3, past: int = 4) -> tuple:
    """Traced shapes, all distinct and above 1, so that no axis is specialised to its example size."""
    shape = (batch, config.num_attention_heads, past, config.head_dim)  # B N S H
    layers = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    ids = torch.full((batch, length), config.bos_token_id or 0, dtype=torch.long)
    mask = torch.ones(batch, past + length, dtype=torch.long)
    positions = torch.arange(past, past + length).repeat(batch, 1)
    return ids, mask, positions, layers


def dynamic_shapes(layers: int) -> tuple:
    dim = torch.export.Dim
    batch, length, past = dim("batch_size"), dim("sequence_length"), dim("past_sequence_length", min=0)
    key_value = {0: batch, 2: past}
    total = {0: batch, 1: dim("total_sequence_length")}  # renamed in the graph: `name_mask_axis`
    return {0: batch, 1: length}, total, {0: batch, 1: length}, [(key_value, key_value)] * layers


def export_onnx(model_folder: Path, config: OPTConfig, out: Path, opset: int = DEFAULT_OPSET) -> dict:
    """Writes `out/model.onnx`; returns the description `export.json` holds."""
    model = OPTForCausalLM.from_pretrained(model_folder, attn_implementation="eager").eval()
    layers = config.num_hidden_layers
    with torch.no_grad():
        program = torch.onnx.export(
            DecoderWithPast(model).eval(),
            example_inputs(config),
            dynamo=True,
            input_names=input_names(layers),
            output_names=output_names(layers),
            dynamic_shapes=dynamic_shapes(layers),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    name_mask_axis(program.model)
    program.save(str(out / MODEL_FILE))  # over ONNX's 2 GB limit the weights go beside it, in model.onnx.data
    return describe(config, opset)


def name_mask_axis(model: onnx_ir.Model) -> None:
    """The mask's length axis as Optimum names it (torch.export names a dimension with an identifier only)."""
    mask = next(value for value in model.graph.inputs if value.name == "attention_mask")
    mask.shape = onnx_ir.Shape([mask.shape[0], onnx_ir.SymbolicDim("past_sequence_length + sequence_length")])


def describe(config: OPTConfig, opset: int) -> dict:
    layers, n, h = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    past = [
        tensor(f"past_key_values.{i}.{kind}", "float32", ["batch_size", n, "past_sequence_length", h])
        for i in range(layers)
        for kind in KEY_VALUE
    ]
    present = [
        tensor(f"present.{i}.{kind}", "float32", ["batch_size", n, "past_sequence_length + sequence_length", h])
        for i in range(layers)
        for kind in KEY_VALUE
    ]
    ids, mask = ids_and_mask("int64")
    mask["shape"][1] = "past_sequence_length + sequence_length"
    return {
        "file": MODEL_FILE,
        "exported_from": f"PyTorch {torch.__version__} (torch.onnx.export, dynamo)",
        "runtime": "onnxruntime",
        "opset": opset,
        "inputs": [ids, mask, tensor("position_ids", "int64", ["batch_size", "sequence_length"]), *past],
        "outputs": [logits(config.vocab_size), *present],
        "usage": (
            "HF Optimum's decoder-with-past layout. First step: past tensors with past_sequence_length 0; then "
            "feed each present.{i}.* back as past_key_values.{i}.* with the new token alone. attention_mask covers "
            "past and new tokens; position_ids are OPT's cumsum(mask) * mask - 1 at the new tokens (padding: any "
            "value >= -1). Logits at padded positions are not meaningful."
        ),
        "run": (
            "import onnxruntime; session = onnxruntime.InferenceSession('model.onnx'); "
            "logits, *present = session.run(None, feeds)"
        ),
    }
