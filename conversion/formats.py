"""HF-layout checkpoints for conversion: reading a folder's tensors, telling its head, writing and verifying one.

Built on the format registry `opt_core.formats` (every format, sharded in HF's own layout) and
`opt_core.checkpoint` (canonical names). Sibling: `conversion.metaseq` reads Meta's original checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from opt_core.checkpoint import save_checkpoint
from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError
from opt_core.formats import detect_format, get_format, read_checkpoint
from opt_core.lazy import LazyTensor, same_bits
from opt_core.weights import LEAF_RULES, to_file_tensors

# Roots of the task heads' names, in every style ("score.weight", "score/kernel:0", "score/kernel").
TASK_HEAD_ROOTS = {"score": "sequence_classification", "qa_outputs": "question_answering"}
# config.json `architectures` of a model without a head. Only needed for tf_model.h5: HF's TF port names the
# decoder `model/decoder/...` in every model class, so the names alone cannot tell OPTModel from OPTForCausalLM.
BASE_ARCHITECTURES = {"OPTModel", "TFOPTModel", "FlaxOPTModel"}


def read_tensors(path: Path, fmt: str | None = None) -> tuple[str, Path, dict[str, np.ndarray]]:
    """(format, file or index, {name as the file spells it: array}) of the checkpoint in a folder or file.

    Safetensors and `.bin` arrays are read-only views of memory-mapped files; the `.h5` and `.msgpack` readers
    return arrays in memory.

    Args:
        path: a folder, a weights file, or a shard index.
        fmt: the format to read; None picks the first present in `opt_core.formats.READ_ORDER`.
    """
    fmt, file = detect_format(path, fmt)
    return fmt, file, dict(read_checkpoint(file, fmt)[1])


def detect_head(names: list[str], style: str, config: OPTConfig) -> str:
    """The model head a checkpoint holds, from its names, else from config.json's `architectures`.

    Args:
        names: the tensor names as the file spells them.
        style: the file's naming style ("torch", "keras" or "flax").
        config: the model's configuration (for `architectures`).
    """
    roots = {name.split(LEAF_RULES[style].sep, 1)[0] for name in names}
    found = sorted({head for root, head in TASK_HEAD_ROOTS.items() if root in roots})
    if len(found) > 1:
        raise CheckpointError(f"the checkpoint holds weights of two task heads ({', '.join(found)}); keep one")
    if found:
        return found[0]
    if "decoder" in roots and "model" not in roots:
        return "base"  # HF OPTModel and FlaxOPTModel name their parameters `decoder.*`
    architectures = config.extra.get("architectures") or []
    if style == "keras" and any(name in BASE_ARCHITECTURES for name in architectures):
        return "base"
    return "causal_lm"


def write_weights(
    tensors: Mapping[str, LazyTensor], folder: Path, config: OPTConfig, head: str, fmt: str, max_shard_size: int
) -> list[str]:
    """Writes canonical tensors as HF names them in `fmt`, sharded above `max_shard_size` bytes; returns file names.

    The writers get lazy tensors and materialise one at a time as they write it, so peak memory follows the
    largest tensor; the Flax writer is the exception (`flax_msgpack` packs each tensor's bytes whole, and the
    sharded reader reads whole shards).
    """
    files = save_checkpoint(tensors, folder, config, head, fmt, max_shard_size=max_shard_size)
    return [file.name for file in files]


def verify_weights(folder: Path, fmt: str, expected: Mapping[str, LazyTensor], config: OPTConfig, head: str) -> None:
    """Re-reads what was written and checks every tensor's name, shape, dtype and bits against `expected`.

    Args:
        folder: the written checkpoint.
        fmt: its format.
        expected: the canonical tensors that were written (already in the output dtype).
        config, head: the model, for the file names.

    Raises:
        CheckpointError: listing every tensor that is missing, unexpected or different.
    """
    _, _, found = read_tensors(folder, fmt)
    wanted = to_file_tensors(expected, config, head, get_format(fmt).style)
    problems = [f"missing {name}" for name in wanted if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in wanted]
    for name, tensor in wanted.items():
        if name not in found:
            continue
        got = found[name]
        if tuple(got.shape) != tensor.shape or got.dtype != tensor.dtype:
            problems.append(f"{name}: wrote {tensor.dtype}{list(tensor.shape)}, read {got.dtype}{list(got.shape)}")
        elif not same_bits(np.asarray(got), np.asarray(tensor)):
            problems.append(f"{name}: values differ from the source")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{folder}: the written checkpoint does not read back as written: " + "; ".join(shown))
