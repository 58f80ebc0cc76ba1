"""OPT for PyTorch users: `OPTModel`, `OPTForCausalLM`, `OPTForSequenceClassification`, `OPTForQuestionAnswering`.

Siblings: `opt_tf` (Keras 3, names prefixed `TF`) and `opt_flax` (names prefixed `Flax`).
"""

from opt_core.config import OPTConfig
from opt_torch.modeling import (
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
)

__all__ = [
    "OPTConfig",
    "OPTForCausalLM",
    "OPTForQuestionAnswering",
    "OPTForSequenceClassification",
    "OPTModel",
]
