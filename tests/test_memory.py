"""Loading without a second copy: peak resident memory of `from_pretrained` in each framework, and torch parameters
that share the safetensors file's pages yet never write to it.

The peaks are measured in fresh processes by `benchmarks/memory.py --measure` (the benchmark's own child), on a
float32 checkpoint of 200 MB whose largest tensor is 6.5 MB: large enough that a framework's fixed cost (Keras'
layers and runtime, about 30 MB) is small beside the weights, and no single tensor dominates.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from opt_core import OPTConfig
from opt_core.lazy import LazyTensor, copy_released, file_range, release_pages
from opt_core.pretrained import save_pretrained
from opt_core.safetensors_file import read_safetensors
from opt_core.weights import fresh_parameter, parameter_specs

ROOT = Path(__file__).resolve().parent.parent
# Peak RSS growth while loading a float32 file, as a multiple of its size. Measured (2 busy cores, Linux):
# torch 0.05 (the weights stay in the page cache until used), flax 1.06, tf 1.21; each was about 2.2x before.
BOUND = 1.3
CONFIG = dict(vocab_size=1000, hidden_size=640, num_hidden_layers=10, ffn_dim=2560, num_attention_heads=10)


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    config = OPTConfig(**CONFIG, max_position_embeddings=128, word_embed_proj_dim=640)
    rng = np.random.default_rng(0)
    canonical = {
        spec.name: LazyTensor(spec.shape, np.float32, lambda spec=spec: fresh_parameter(spec, config, rng), spec.name)
        for spec in parameter_specs(config, "causal_lm")
    }
    out = tmp_path_factory.mktemp("memory")
    save_pretrained(
        out, canonical, config, "causal_lm", architecture="OPTForCausalLM", generation_config=None, fmt="safetensors"
    )
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS through /proc/self/status")
@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_loading_holds_one_copy(folder, framework):
    size = (folder / "model.safetensors").stat().st_size
    found = _benchmark().measure_in_subprocess(framework, folder, "auto", forward=False)
    ratio = found["load"] / size
    assert ratio <= BOUND, f"{framework}: peak RSS grew {ratio:.2f}x the {size / 2**20:.0f} MiB file while loading"


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mappings through /proc/self/maps")
def test_torch_parameters_share_the_file_but_never_write_it(folder):
    import torch

    from opt_torch import OPTForCausalLM

    file = (folder / "model.safetensors").resolve()
    before = _digest(file)
    model = OPTForCausalLM.from_pretrained(folder)  # float32 file, float32 model: no cast, no copy
    mapped = _file_mappings(file)
    for name, param in model.named_parameters():
        assert any(begin <= param.data_ptr() < end for begin, end in mapped), f"{name} is a copy"
    embedding, fc1 = model.get_input_embeddings().weight, model.model.decoder.layers[0].fc1.weight
    expected, fc1_expected = embedding.detach().clone(), fc1.detach().clone()
    with torch.no_grad():
        embedding.add_(1.0)  # as an optimizer step would
    assert _digest(file) == before
    again = OPTForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(again.get_input_embeddings().weight, expected, rtol=0, atol=0)
    # Saving over the very file the parameters map: the new file is renamed over the old, whose pages the
    # model keeps reading.
    model.save_pretrained(folder)
    torch.testing.assert_close(fc1, fc1_expected, rtol=0, atol=0)
    saved = OPTForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(saved.get_input_embeddings().weight, expected + 1, rtol=0, atol=0)


def test_torch_cast_parameters_are_copies(folder):
    import torch

    from opt_torch import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float16)
    mapped = _file_mappings((folder / "model.safetensors").resolve())
    assert all(not any(b <= p.data_ptr() < e for b, e in mapped) for p in model.parameters())


def test_released_pages_read_back_the_same_values(folder):
    tensors = read_safetensors(folder / "model.safetensors")
    name = "model.decoder.layers.0.fc1.weight"
    array = tensors[name]
    expected = np.array(array)
    release_pages(array)
    np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(copy_released(array, np.float32, transpose=True), expected.T)
    where = file_range(array)
    assert where is not None and where.nbytes == array.nbytes
    with open(where.path, "rb") as f:
        f.seek(where.offset)
        assert f.read(16) == expected.tobytes()[:16]
    # Copies and transposed views are not file ranges; releasing them does nothing.
    assert file_range(expected) is None and file_range(array.T) is None
    release_pages(expected)
