"""What every target's exporter shares: the tensor descriptions `export.json` lists, and quiet framework logs.

Siblings: `opt_export.onnx`, `opt_export.saved_model`, `opt_export.stablehlo` (the exporters, which import this),
and `opt_export.folder` (which calls them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence

# The framework loggers an export would otherwise fill the terminal from (progress, deprecations, registrations).
NOISY_LOGGERS = ("torch", "torch.onnx", "torch.export", "onnxscript", "tensorflow", "absl", "jax", "keras")


def tensor(name: str, dtype: str, shape: Sequence[int | str]) -> dict:
    """One input or output as `export.json` lists it: a named axis is dynamic, an int fixed."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def ids_and_mask(dtype: str, batch: int | str = "batch_size", length: int | str = "sequence_length") -> list[dict]:
    """The two inputs every export takes: B T token ids and the B T padding mask (1 real, 0 padding)."""
    return [tensor("input_ids", dtype, [batch, length]), tensor("attention_mask", dtype, [batch, length])]


def logits(vocab_size: int, batch: int | str = "batch_size", length: int | str = "sequence_length") -> dict:
    return tensor("logits", "float32", [batch, length, vocab_size])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Runs an export without the frameworks' warnings and logs on the user's terminal.

    Python warnings are ignored and the frameworks' loggers raised to ERROR; native code (TF's and the TFLite
    converter's C++, absl) writes straight to file descriptor 2, which is sent to a temporary file meanwhile and
    shown only when the export fails, so its diagnosis is not lost.
    """
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    sys.stderr.flush()
    saved_fd, failed = os.dup(2), False
    with tempfile.TemporaryFile() as captured, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace")[-20000:])
