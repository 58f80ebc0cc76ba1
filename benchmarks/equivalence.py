"""Worst fp32 difference to HF transformers' PyTorch OPT, per framework, over every config variant and head.

    python benchmarks/equivalence.py [--frameworks torch tf flax]

Uses the test harness's tiny models (tests/conftest.py: six config variants, random values in every parameter),
saved by HF, loaded by each framework, on a left-padded batch; compares real-token outputs (logits, pooled logits,
start/end logits, last hidden state). The tests assert 1e-5; this prints what is actually reached.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from conftest import HEADS, VARIANTS, make_hf_model, sample_batch  # noqa: E402

CLASSES = {
    "torch": ("opt_torch", ""),
    "tf": ("opt_tf", "TF"),
    "flax": ("opt_flax", "Flax"),
}


def outputs(out, head: str) -> np.ndarray:
    if head == "base":
        return np.asarray(out.last_hidden_state)
    if head == "question_answering":
        return np.stack([np.asarray(out.start_logits), np.asarray(out.end_logits)], -1)
    return np.asarray(out.logits)


def run(framework: str, folder: Path, head: str, ids, mask) -> np.ndarray:
    module_name, prefix = CLASSES[framework]
    module = __import__(module_name)
    model = getattr(module, prefix + HEADS[head]).from_pretrained(folder)
    if framework == "torch":
        import torch

        with torch.no_grad():
            return outputs(model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)), head)
    return outputs(model(ids, attention_mask=mask), head)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=list(CLASSES))
    args = parser.parse_args()
    worst = {fw: (0.0, "") for fw in args.frameworks}
    ids, mask = sample_batch(seed=0, length=12)
    real = mask.astype(bool)
    for variant in VARIANTS:
        for head in HEADS:
            hf = make_hf_model(variant, head)
            with torch.no_grad():
                expected = outputs(hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)), head)
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(tmp)
                for fw in args.frameworks:
                    actual = run(fw, Path(tmp), head, ids, mask)
                    pick = slice(None) if head == "sequence_classification" else real
                    diff = float(np.abs(actual[pick].astype(np.float64) - expected[pick]).max())
                    if diff > worst[fw][0]:
                        worst[fw] = (diff, f"{variant}/{head}")
    for fw, (diff, where) in worst.items():
        print(
            f"{fw:<6} worst |difference| to HF on real tokens: {diff:.2e} ({where}); "
            f"{len(VARIANTS)} variants x {len(HEADS)} heads"
        )


if __name__ == "__main__":
    main()
