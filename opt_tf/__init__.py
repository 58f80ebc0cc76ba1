"""OPT for Keras 3 users (TensorFlow backend): `TFOPTModel`, `TFOPTForCausalLM`, `TFOPTForSequenceClassification`,
`TFOPTForQuestionAnswering`.

Siblings: `opt_torch` (names without the prefix) and `opt_flax` (names prefixed `Flax`). Importing this package
selects Keras' TensorFlow backend unless `KERAS_BACKEND` already names one.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
