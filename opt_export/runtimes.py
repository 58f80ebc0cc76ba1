"""Runs an export folder with its own runtime alone: numpy in, numpy out, no torch, Keras, Flax or this library's
models imported (only numpy and the one runtime).

Siblings: the exporters (`opt_export.onnx`, `opt_export.saved_model`, `opt_export.stablehlo`) write what these
read. `load(folder)` picks the runner from the folder's `export.json`; every runner has `logits(ids, mask)` (B T
ids and a left-padded B T mask -> B T V float32), and ONNX's `greedy(ids, mask, max_new_tokens)` decodes over ONNX
Runtime's past keys and values as `generate` does greedily: finished rows are padded, decoding stops when every
row has met an eos id.

    python -m opt_export.runtimes FOLDER            # runs the folder once on a short batch and prints the shapes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def positions(mask: np.ndarray, length: int) -> np.ndarray:
    """OPT's positions of the last `length` tokens: `cumsum(mask) * mask - 1` over the whole mask (B S -> B T)."""
    return (np.cumsum(mask, axis=1) * mask - 1)[:, -length:]


class OnnxRunner:
    """An ONNX export in an `onnxruntime.InferenceSession`: Optimum's decoder-with-past names and layout.

    Args:
        folder: the export folder (model.onnx, export.json, config.json).
    """

    def __init__(self, folder: Path):
        import onnxruntime

        self.folder = Path(folder)
        self.session = onnxruntime.InferenceSession(str(self.folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: dict | None) -> tuple[np.ndarray, dict]:
        """New tokens' logits (B T V) and the present keys and values, renamed as the next step's past."""
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask, ids.shape[1])}
        feeds.update(past or self.empty_past(ids.shape[0]))
        logits, *present = self.session.run(self.output_names, feeds)
        names = [name.replace("present.", "past_key_values.", 1) for name in self.output_names[1:]]
        return logits, dict(zip(names, present))

    def empty_past(self, batch: int) -> dict:
        """Past keys and values of length 0, B N 0 H, for the first step."""
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past_inputs}

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.step(ids.astype(np.int64), mask.astype(np.int64), None)[0]

    def greedy(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Prompt + greedy tokens (B, T0 + up to max_new_tokens), one cached step per token."""
        eos, pad = self.special_ids()
        ids, mask = ids.astype(np.int64), mask.astype(np.int64)
        sequences, unfinished = ids, np.ones(len(ids), bool)
        logits, past = self.step(ids, mask, None)
        for _ in range(max_new_tokens):
            token = np.where(unfinished, logits[:, -1].argmax(-1), pad)  # finished rows: pad, as HF
            sequences = np.concatenate([sequences, token[:, None]], axis=1)
            unfinished &= ~np.isin(token, eos)
            if not unfinished.any() or sequences.shape[1] == ids.shape[1] + max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
            logits, past = self.step(token[:, None], mask, past)
        return sequences

    def special_ids(self) -> tuple[list[int], int]:
        """eos ids and the pad id, from generation_config.json over config.json, as `generate` reads them."""
        config = {**read_json(self.folder / "config.json"), **read_json(self.folder / "generation_config.json")}
        eos = config.get("eos_token_id")
        eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
        pad = config.get("pad_token_id")
        return eos, pad if pad is not None else (eos[0] if eos else 0)


class SavedModelRunner:
    """A SavedModel's `serving_default` signature, loaded by `tf.saved_model.load` (no Keras)."""

    def __init__(self, folder: Path):
        import tensorflow as tf

        self.tf = tf
        self.serve = tf.saved_model.load(str(folder)).signatures["serving_default"]

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        tf = self.tf
        out = self.serve(input_ids=tf.constant(ids, tf.int32), attention_mask=tf.constant(mask, tf.int32))
        return out["logits"].numpy()


class TFLiteRunner:
    """A `.tflite` model in the LiteRT interpreter; its fixed shapes are in its input details."""

    def __init__(self, folder: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.run = Interpreter(model_path=str(Path(folder) / "model.tflite")).get_signature_runner("serving_default")

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.run(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32))["logits"]


class StableHLORunner:
    """A serialized `jax.export.Exported`, deserialized and called (jax alone)."""

    def __init__(self, folder: Path):
        from jax import export

        self.exported = export.deserialize(bytearray((Path(folder) / "model.jax_exported").read_bytes()))

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray(self.exported.call(ids.astype(np.int32), mask.astype(np.int32)))


RUNNERS = {"onnx": OnnxRunner, "saved-model": SavedModelRunner, "tflite": TFLiteRunner, "stablehlo": StableHLORunner}


def load(folder: str | Path):
    """The runner of the export in `folder`, from its export.json's target."""
    folder = Path(folder)
    target = read_json(folder / "export.json").get("target")
    if target not in RUNNERS:
        raise ValueError(f"{folder}: no export.json naming one of {', '.join(RUNNERS)} (found {target!r})")
    return RUNNERS[target](folder)


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    shapes = {i["name"]: i["shape"] for i in read_json(folder / "export.json")["inputs"]}
    batch, length = (n if isinstance(n, int) else 2 for n in shapes["input_ids"])
    ids = np.full((batch, length), 2, np.int64)
    print(folder, "logits", load(folder).logits(ids, np.ones_like(ids)).shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
