"""A TF SavedModel from Keras 3, and a LiteRT (`.tflite`) model converted from that SavedModel.

Siblings: `opt_export.onnx` (PyTorch), `opt_export.stablehlo` (Flax).

* SavedModel: `keras.export.ExportArchive` (what `model.export` runs) tracks the model's variables and adds one
  endpoint, the serving signature `serving_default`: `input_ids`, `attention_mask` (B T int32, dynamic batch and
  sequence) -> `{"logits": B T V float32}`. `tf.saved_model.load(folder).signatures["serving_default"]` runs it
  without this library or Keras; so does TF Serving.
* LiteRT: the SavedModel's signature at a fixed batch and sequence length (the converter's native kernels take
  the attention mask's boolean slices at static shapes only, and a fixed shape is what on-device runtimes plan
  for), converted with TFLite's builtin ops alone, so the plain LiteRT interpreter runs it. Shorter prompts are
  left-padded to the length (OPT's positions skip padding, so the real tokens' logits do not change).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_core.config import OPTConfig  # noqa: E402
from opt_export.common import ids_and_mask, logits  # noqa: E402
from opt_tf import TFOPTForCausalLM  # noqa: E402

SIGNATURE = "serving_default"
TFLITE_FILE = "model.tflite"
DEFAULT_TFLITE_BATCH = 1
DEFAULT_TFLITE_LENGTH = 128


def serving_specs(batch: int | None = None, length: int | None = None) -> list[tf.TensorSpec]:
    return [
        tf.TensorSpec([batch, length], tf.int32, name="input_ids"),
        tf.TensorSpec([batch, length], tf.int32, name="attention_mask"),
    ]


def write_saved_model(model_folder: Path, out: Path) -> None:
    """The Keras model's variables and its serving signature, written as a SavedModel into `out`."""
    model = TFOPTForCausalLM.from_pretrained(model_folder)

    def serve(input_ids, attention_mask):
        return {"logits": model(input_ids, attention_mask=attention_mask, use_cache=False).logits}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=serving_specs())
    archive.write_out(str(out), verbose=False)


def export_saved_model(model_folder: Path, config: OPTConfig, out: Path) -> dict:
    """Writes the SavedModel into `out`; returns the description `export.json` holds."""
    write_saved_model(model_folder, out)
    return {
        "file": "saved_model.pb",
        "exported_from": f"Keras {keras.__version__} on TensorFlow {tf.__version__} (keras.export.ExportArchive)",
        "runtime": "tensorflow (tf.saved_model.load) or TF Serving",
        "signature": SIGNATURE,
        "inputs": ids_and_mask("int32"),
        "outputs": [logits(config.vocab_size)],
        "usage": "Left-pad a batch; logits at padded positions are not meaningful.",
        "run": (
            "import tensorflow as tf; serve = tf.saved_model.load(folder).signatures['serving_default']; "
            "logits = serve(input_ids=ids, attention_mask=mask)['logits']"
        ),
    }


def export_tflite(
    model_folder: Path,
    config: OPTConfig,
    out: Path,
    batch_size: int = DEFAULT_TFLITE_BATCH,
    sequence_length: int | None = None,
) -> dict:
    """Writes `out/model.tflite`, converted from a SavedModel of the model at B = batch_size, T = sequence_length
    (default: 128, or max_position_embeddings when smaller); returns the description `export.json` holds."""
    sequence_length = sequence_length or min(DEFAULT_TFLITE_LENGTH, config.max_position_embeddings)
    with tempfile.TemporaryDirectory(dir=out) as saved:
        write_saved_model(model_folder, Path(saved))
        (out / TFLITE_FILE).write_bytes(convert_to_tflite(Path(saved), batch_size, sequence_length))
    return {
        "file": TFLITE_FILE,
        "exported_from": f"a SavedModel of Keras {keras.__version__}, TFLite converter of TensorFlow {tf.__version__}",
        "runtime": "LiteRT (ai_edge_litert.interpreter.Interpreter), builtin ops only",
        "signature": SIGNATURE,
        "inputs": ids_and_mask("int32", batch_size, sequence_length),
        "outputs": [logits(config.vocab_size, batch_size, sequence_length)],
        "usage": (
            f"Fixed shapes: exactly {batch_size} x {sequence_length} ids; left-pad shorter prompts (mask 0). "
            "Logits at padded positions are not meaningful."
        ),
        "run": (
            "from ai_edge_litert.interpreter import Interpreter; "
            "run = Interpreter(model_path='model.tflite').get_signature_runner('serving_default'); "
            "logits = run(input_ids=ids, attention_mask=mask)['logits']"
        ),
    }


def convert_to_tflite(saved_model: Path, batch_size: int, sequence_length: int) -> bytes:
    """The SavedModel's serving signature at fixed shapes, as a `.tflite` flatbuffer of builtin ops."""
    loaded = tf.saved_model.load(str(saved_model))
    serve = loaded.signatures[SIGNATURE]

    @tf.function(input_signature=serving_specs(batch_size, sequence_length))
    def fixed(input_ids, attention_mask):
        return serve(input_ids=input_ids, attention_mask=attention_mask)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fixed.get_concrete_function()], loaded)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()
