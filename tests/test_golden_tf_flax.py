"""Files written by HF transformers 4.55's TF and Flax ports (tests/golden/make_tf_flax_golden.py, which also
checks the other direction: HF 4.55 loads the files our opt_tf / opt_flax write) load here with HF's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_on_real_tokens

GOLDEN = Path(__file__).parent / "golden" / "hf_tf_flax"
VARIANTS = sorted(p.name for p in GOLDEN.iterdir())


def logits(framework: str, folder: Path, fmt: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The golden folder holds both formats; `fmt` picks the one under test."""
    if framework == "torch":
        import torch

        from opt_torch import OPTForCausalLM

        model = OPTForCausalLM.from_pretrained(folder, fmt=fmt)
        with torch.no_grad():
            return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    if framework == "tf":
        from opt_tf import TFOPTForCausalLM

        return np.asarray(TFOPTForCausalLM.from_pretrained(folder, fmt=fmt)(ids, attention_mask=mask).logits)
    from opt_flax import FlaxOPTForCausalLM

    return np.asarray(FlaxOPTForCausalLM.from_pretrained(folder, fmt=fmt)(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["tf", "flax"])
@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_hf_written_tf_and_flax_files_give_hfs_logits(variant, fmt, framework):
    folder = GOLDEN / variant
    ids, mask = np.load(folder / "input_ids.npy"), np.load(folder / "attention_mask.npy")
    actual = logits(framework, folder, fmt, ids, mask)
    assert_close_on_real_tokens(actual, np.load(folder / "logits.npy"), mask, atol=2e-5)
