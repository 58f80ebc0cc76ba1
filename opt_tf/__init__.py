"""OPT for Keras 3 users (TensorFlow backend): `TFOPTModel`, `TFOPTForCausalLM`, `TFOPTForSequenceClassification`,
`TFOPTForQuestionAnswering`.

Siblings: `opt_torch` (names without the prefix) and `opt_flax` (names prefixed `Flax`). Importing this package
selects Keras' TensorFlow backend unless `KERAS_BACKEND` already names one, and, when TensorFlow has not started yet,
keeps XLA's compiled programs on disk between processes (`opt_core.compile_cache`; OPT_LM_COMPILE_CACHE=0 turns it
off).

TensorFlow 2.21 writes native log lines to stderr while it loads ("oneDNN custom operations are on", "Could not
find cuda drivers" on a CPU machine), past TF_CPP_MIN_LOG_LEVEL. Importing this package first loads TensorFlow with
the process's stderr pointed at /dev/null, unless TF_CPP_MIN_LOG_LEVEL=0 asks for TensorFlow's logs; Python errors
raised by the import still reach the terminal.
"""

import contextlib
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Points file descriptor 2 at /dev/null for the block (C++ libraries write there directly)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


if "tensorflow" not in sys.modules:  # TF reads TF_XLA_FLAGS once, when it starts
    from opt_core.compile_cache import tf_xla_flags

    os.environ["TF_XLA_FLAGS"] = tf_xla_flags(os.environ.get("TF_XLA_FLAGS", ""))
    quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0"
    with _native_stderr_silenced() if quiet else contextlib.nullcontext():
        import tensorflow  # noqa: F401

from opt_core.config import OPTConfig  # noqa: E402
from opt_tf.modeling import (  # noqa: E402
    TFOPTForCausalLM,
    TFOPTForQuestionAnswering,
    TFOPTForSequenceClassification,
    TFOPTModel,
)

__all__ = [
    "OPTConfig",
    "TFOPTForCausalLM",
    "TFOPTForQuestionAnswering",
    "TFOPTForSequenceClassification",
    "TFOPTModel",
]
