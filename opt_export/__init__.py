"""Exports of a causal LM that their own runtimes run, without this library: `opt-lm export MODEL OUT --to TARGET`.

| target        | from                                  | runtime                               | shapes  |
|---------------|---------------------------------------|---------------------------------------|---------|
| `onnx`        | PyTorch, `torch.onnx.export` (dynamo) | ONNX Runtime                          | dynamic |
| `saved-model` | Keras 3, `keras.export.ExportArchive` | `tf.saved_model.load` (TF Serving)    | dynamic |
| `tflite`      | that SavedModel, TFLite converter     | LiteRT (`ai_edge_litert.interpreter`) | fixed   |
| `stablehlo`   | Flax, `jax.export` of the jitted call | `jax.export.deserialize(...).call`    | dynamic |

Dynamic: any batch size and sequence length (and past length, for ONNX); fixed: B x T chosen at export.

Modules: `opt_export.onnx`, `opt_export.saved_model` (SavedModel and LiteRT), `opt_export.stablehlo`, one per target
in its framework's idiom; `opt_export.folder` writes an export folder crash-safely with `export.json` (inputs,
outputs, shapes, dtypes, how to run it) and the model's config and tokenizer files beside it;
`opt_export.runtimes` runs each export with its runtime alone (numpy in, numpy out), greedy decoding over ONNX
Runtime's past keys and values included.
"""

from opt_export.folder import TARGETS, export

__all__ = ["TARGETS", "export"]
