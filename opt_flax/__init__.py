"""OPT for JAX users: `FlaxOPTModel`, `FlaxOPTForCausalLM`, `FlaxOPTForSequenceClassification`,
`FlaxOPTForQuestionAnswering` (Flax Linen, HF's Flax params layout).

Siblings: `opt_torch` (no prefix) and `opt_tf` (names prefixed `TF`). Sharding over a device mesh:
`opt_flax.sharding`.
"""

from opt_core.config import OPTConfig
from opt_flax.modeling import (
    FlaxOPTForCausalLM,
    FlaxOPTForQuestionAnswering,
    FlaxOPTForSequenceClassification,
    FlaxOPTModel,
)

__all__ = [
    "FlaxOPTForCausalLM",
    "FlaxOPTForQuestionAnswering",
    "FlaxOPTForSequenceClassification",
    "FlaxOPTModel",
    "OPTConfig",
]
