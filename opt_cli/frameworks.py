"""One small adapter per framework, so each CLI command is written once: load a causal LM, get logits, generate.

Inputs and outputs are numpy arrays; each adapter converts at its edge. The framework is imported only when its
adapter is built.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FRAMEWORKS = ("torch", "tf", "flax")


class CausalLM:
    """A loaded causal LM of one framework, behind numpy in / numpy out."""

    def __init__(self, framework: str, model: Any):
        self.framework, self.model, self.config = framework, model, model.config

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """B T V float32 logits."""
        if self.framework == "torch":
            import torch

            with torch.no_grad():
                out = self.model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            return out.logits.float().numpy()
        return np.asarray(self.model(ids, attention_mask=mask).logits, dtype=np.float32)

    def generate(self, ids: np.ndarray, mask: np.ndarray, **options: Any) -> np.ndarray:
        if self.framework == "torch":
            import torch

            out = self.model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **options)
            return out.numpy()
        return np.asarray(self.model.generate(ids, attention_mask=mask, **options))


def load_causal_lm(framework: str, name_or_path: str | os.PathLike, **kwargs: Any) -> CausalLM:
    """Loads `OPTForCausalLM` / `TFOPTForCausalLM` / `FlaxOPTForCausalLM` from a folder or hub id."""
    if framework == "torch":
        from opt_torch import OPTForCausalLM as model_class
    elif framework == "tf":
        from opt_tf import TFOPTForCausalLM as model_class
    elif framework == "flax":
        from opt_flax import FlaxOPTForCausalLM as model_class
    else:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    return CausalLM(framework, model_class.from_pretrained(name_or_path, **kwargs))
