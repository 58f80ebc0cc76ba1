"""Writes contrastive_search.json: HF transformers 4.55's contrastive-search ids on the test harness's tiny models.

HF moved contrastive search out of its core after 4.55, so 4.55 is the oracle. Run with that release:

    python -m venv --system-site-packages /tmp/hf455 && /tmp/hf455/bin/pip install transformers==4.55.4
    /tmp/hf455/bin/python tests/golden/make_contrastive_golden.py

The weights come from `conftest.make_hf_model` (seeded); a checksum of them is stored so the test can tell
that it rebuilt the same model.
"""

import json
import sys
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from conftest import make_hf_model, sample_batch  # noqa: E402

CASES = {
    "alpha0.6_k4": dict(penalty_alpha=0.6, top_k=4, max_new_tokens=12),
    "alpha0.3_k3_eos": dict(penalty_alpha=0.3, top_k=3, max_new_tokens=12, eos_token_id=[5, 17, 40, 55, 60, 70]),
}


def weights_checksum(model) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def main() -> None:
    golden = {"transformers": transformers.__version__, "variants": {}}
    for variant in ("pre_ln", "post_ln_proj"):
        model = make_hf_model(variant)
        ids, mask = sample_batch(seed=21, length=7)
        entry = {"checksum": weights_checksum(model), "input_ids": ids.tolist(), "attention_mask": mask.tolist()}
        for name, options in CASES.items():
            with torch.no_grad():
                out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **options)
            entry[name] = {"options": options, "ids": out.tolist()}
        golden["variants"][variant] = entry
    (HERE / "contrastive_search.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("wrote", HERE / "contrastive_search.json")


if __name__ == "__main__":
    main()
