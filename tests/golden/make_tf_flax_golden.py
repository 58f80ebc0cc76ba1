"""Golden files from HF transformers 4.55's TF and Flax ports (removed from transformers 5), in both directions.

Run with that release (its TF port needs tf-keras; its Flax port flax):

    python -m venv --system-site-packages /tmp/hf455 && /tmp/hf455/bin/pip install transformers==4.55.4
    /tmp/hf455/bin/python tests/golden/make_tf_flax_golden.py

1. HF -> us: writes `hf_tf_flax/<variant>/` with `tf_model.h5` saved by HF's TFOPTForCausalLM and
   `flax_model.msgpack` saved by HF's FlaxOPTForCausalLM (both converted by HF from the same PyTorch weights), and
   `logits.npy`, HF PyTorch's logits on `input_ids.npy`. tests/test_golden_tf_flax.py loads them in our frameworks.
2. us -> HF: saves the same weights with our `opt_tf` / `opt_flax` `save_pretrained`, loads them with HF's TF and
   Flax ports, and checks the logits; it prints the worst difference and fails loudly on a mismatch.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import transformers  # noqa: E402
from conftest import make_hf_model, sample_batch  # noqa: E402

VARIANTS = ("pre_ln", "post_ln_proj")


def hf_logits(model_class, folder, ids, mask, **kwargs):
    model = model_class.from_pretrained(folder, **kwargs)
    return np.asarray(model(ids, attention_mask=mask).logits)


def main() -> None:
    worst = 0.0
    for variant in VARIANTS:
        out = HERE / "hf_tf_flax" / variant
        out.mkdir(parents=True, exist_ok=True)
        torch_model = make_hf_model(variant)
        ids, mask = sample_batch(seed=31, length=8)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        with tempfile.TemporaryDirectory() as tmp:
            torch_model.save_pretrained(tmp)
            tf_model = transformers.TFOPTForCausalLM.from_pretrained(tmp, from_pt=True)
            tf_model.save_pretrained(out)  # tf_model.h5 + config.json
            flax_model = transformers.FlaxOPTForCausalLM.from_pretrained(tmp, from_pt=True)
            flax_model.save_pretrained(out)  # flax_model.msgpack
        for name in ("generation_config.json",):
            (out / name).unlink(missing_ok=True)
        np.save(out / "input_ids.npy", ids)
        np.save(out / "attention_mask.npy", mask)
        np.save(out / "logits.npy", expected)
        worst = max(worst, check_ours_load_in_hf(torch_model, ids, mask, expected))
    print(f"HF 4.55's TF and Flax ports load our files; worst |logits difference| on real tokens: {worst:.2e}")


def check_ours_load_in_hf(torch_model, ids, mask, expected) -> float:
    from opt_flax import FlaxOPTForCausalLM
    from opt_tf import TFOPTForCausalLM

    real = mask.astype(bool)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        for ours, theirs in (
            (TFOPTForCausalLM, transformers.TFOPTForCausalLM),
            (FlaxOPTForCausalLM, transformers.FlaxOPTForCausalLM),
        ):
            folder = Path(tmp) / ours.__name__
            ours.from_pretrained(tmp).save_pretrained(folder)
            (folder / "model.safetensors").unlink(missing_ok=True)
            got = hf_logits(theirs, folder, ids, mask)
            diff = float(np.abs(got[real] - expected[real]).max())
            assert diff < 2e-5, f"{theirs.__name__} on our {folder.name}: {diff}"
            worst = max(worst, diff)
    return worst


if __name__ == "__main__":
    main()
