"""Quick start: build a small OPT, save it in every format OPT ships in, load each back, and compare logits.

    python examples/quickstart.py

Runs offline on a fresh machine in a few seconds. (The `opt-lm generate` command with an embedded trained model
replaces this as the main job once it lands.)
"""

import tempfile
from pathlib import Path

import torch

from opt_core import OPTConfig
from opt_core.formats import FORMATS
from opt_torch import OPTForCausalLM


def main() -> None:
    torch.manual_seed(0)
    config = OPTConfig.from_preset("opt-125m", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128)
    model = OPTForCausalLM(config).eval()
    ids = torch.tensor([[2, 1000, 2000, 3000, 4000]])
    with torch.no_grad():
        reference = model(ids).logits
    print(f"OPT with {model.num_parameters():,} parameters; logits {tuple(reference.shape)}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            folder = Path(tmp) / fmt
            model.save_pretrained(folder, fmt=fmt)
            loaded = OPTForCausalLM.from_pretrained(folder)
            with torch.no_grad():
                diff = (loaded(ids).logits - reference).abs().max().item()
            files = ", ".join(sorted(p.name for p in folder.iterdir()))
            print(f"{fmt:>12}: {files:<40} max |logits difference| = {diff:.1e}")


if __name__ == "__main__":
    main()
