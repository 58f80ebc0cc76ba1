"""`from_pretrained(..., device_map=...)` in PyTorch (`opt_torch.device_map`): accelerate's placement with HF
transformers' meaning, checked against HF itself.

On this CPU machine the devices are "cpu" and "disk": the maps accelerate plans under a memory budget equal HF's,
the dispatched model gives the logits and ids of the model loaded whole, disk weights are read from the checkpoint
in place (or from `offload_folder` when the checkpoint cannot be mapped), and what a dispatched model cannot do is
refused by name. GPU placement runs the same code with GPU devices in the map; it is not exercised here.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import FP32_ATOL, sample_batch

from opt_core.errors import ConfigError
from opt_torch import OPTForCausalLM, OPTForSequenceClassification

IDS, MASK = (torch.from_numpy(a) for a in sample_batch())


def logits(model):
    with torch.no_grad():
        return model(IDS, attention_mask=MASK).logits


def greedy(model, **kwargs):
    return model.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, **kwargs)


def weights_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


def layer_map(head_device, layers: list) -> dict:
    """A causal LM map: embeddings and final norm with the LM head on `head_device`, layer i on layers[i]."""
    names = ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.final_layer_norm", "lm_head")
    return {**dict.fromkeys(names, head_device), **{f"model.decoder.layers.{i}": d for i, d in enumerate(layers)}}


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}, torch.device("cpu")], ids=str)
def test_one_device_loads_as_without_a_map(hf_checkpoint, device_map):
    """A map of one device places the model there with no hooks: the weights still share the file's pages."""
    folder, _ = hf_checkpoint("pre_ln")
    plain = OPTForCausalLM.from_pretrained(folder)
    model = OPTForCausalLM.from_pretrained(folder, device_map=device_map)
    assert model.hf_device_map == {"": "cpu"} and not model.is_dispatched
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert torch.equal(logits(model), logits(plain))


@pytest.mark.parametrize("variant", ["pre_ln", "untied", "post_ln_proj"])
@pytest.mark.parametrize("strategy", ["auto", "sequential"])
@pytest.mark.parametrize("budget", [0.3, 0.8])  # of the weights' bytes
def test_strategies_plan_hf_s_map_and_give_its_logits(hf_checkpoint, tmp_path, variant, strategy, budget):
    """Under a CPU budget smaller than the model, accelerate spills modules to the disk; the map equals the one
    HF transformers plans for its own OPT, and the logits and greedy ids are those of the model loaded whole."""
    folder, hf_model = hf_checkpoint(variant)
    max_memory = {"cpu": int(weights_bytes(hf_model) * budget)}
    model = OPTForCausalLM.from_pretrained(folder, device_map=strategy, max_memory=max_memory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map=strategy, max_memory=max_memory, offload_folder=tmp_path
    )
    assert model.hf_device_map == hf.hf_device_map
    expected = {"cpu", "disk"} if budget == 0.8 else {"disk"}  # the layers that fit stay in memory
    assert set(model.hf_device_map.values()) == expected and model.is_dispatched
    plain = OPTForCausalLM.from_pretrained(folder)
    assert torch.equal(logits(model), logits(plain))  # the same bytes, the same arithmetic
    real = MASK.bool()
    assert (logits(model)[real] - logits(hf)[real]).abs().max() <= FP32_ATOL
    assert torch.equal(greedy(model), greedy(plain))


def test_disk_weights_are_read_from_the_safetensors_file_in_place(hf_checkpoint, tmp_path):
    """Everything on the disk: every parameter stays on the meta device, nothing is written anywhere, and each
    module's weights come from the checkpoint for its forward only. Beam search and a save work on it too."""
    folder, _ = hf_checkpoint("pre_ln")
    model = OPTForCausalLM.from_pretrained(folder, device_map={"": "disk"})
    assert all(p.is_meta for p in model.parameters())
    plain = OPTForCausalLM.from_pretrained(folder)
    assert torch.equal(logits(model), logits(plain))
    assert all(p.is_meta for p in model.parameters())  # the forward brought them in and put them back
    assert torch.equal(greedy(model, num_beams=2), greedy(plain, num_beams=2))
    model.save_pretrained(tmp_path / "saved")
    again = OPTForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values()))


def test_a_hand_written_map_and_a_cast_from_fp16(hf_checkpoint, tmp_path):
    """A dict map with one layer on the disk over an fp16 checkpoint loaded as float32: the disk layer is cast at
    each use, and the logits equal the whole model's, loaded the same way."""
    folder, _ = hf_checkpoint("pre_ln")
    OPTForCausalLM.from_pretrained(folder).save_pretrained(tmp_path, dtype="float16")
    device_map = layer_map("cpu", ["disk", "cpu"])
    model = OPTForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    assert model.hf_device_map == device_map and model.dtype == torch.float32
    assert all(p.is_meta for p in model.model.decoder.layers[0].parameters())
    assert not any(p.is_meta for p in model.model.decoder.layers[1].parameters())
    plain = OPTForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(model), logits(plain))
    assert torch.equal(greedy(model), greedy(plain))


def test_a_checkpoint_that_cannot_be_mapped_offloads_to_offload_folder(hf_checkpoint, tmp_path):
    """A TF .h5 checkpoint is not all read in place: the disk weights whose bytes are not torch's need
    offload_folder (the error says so, naming the weight), where each is written once as HF writes them,
    {name}.safetensors."""
    folder, _ = hf_checkpoint("pre_ln")
    plain = OPTForCausalLM.from_pretrained(folder)
    plain.save_pretrained(tmp_path / "tf", fmt="tf")
    device_map = layer_map("cpu", ["cpu", "disk"])
    with pytest.raises(ConfigError, match=r"model\.decoder\.layers\.1\..*offload_folder"):
        OPTForCausalLM.from_pretrained(tmp_path / "tf", device_map=device_map)
    model = OPTForCausalLM.from_pretrained(tmp_path / "tf", device_map=device_map, offload_folder=tmp_path / "off")
    # The .h5 holds the dense kernels transposed (TF's [in, out]), so they are written in torch's layout; the
    # biases and norms are contiguous in the file and read in place, like safetensors
    dense = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    written = {p.name for p in (tmp_path / "off").iterdir()}
    assert written == {f"model.decoder.layers.1.{name}.weight.safetensors" for name in dense}
    assert torch.equal(logits(model), logits(plain))


def test_a_classification_head_on_the_disk(hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln", "sequence_classification")
    plain = OPTForSequenceClassification.from_pretrained(folder)
    model = OPTForSequenceClassification.from_pretrained(folder, device_map={"model": "cpu", "score": "disk"})
    assert model.score.weight.is_meta
    assert torch.equal(logits(model), logits(plain))


BAD_MAPS = [
    ({"model.decoder.layers.9": "cpu", "": "cpu"}, "does not have: model.decoder.layers.9"),
    ({"model.decoder": "cpu"}, "places no device for these parameters: lm_head.weight"),
    (layer_map("cpu", ["cpu", "cpu"]) | {"lm_head": "disk"}, "lm_head.weight on 'disk'.*share one weight"),
]


@pytest.mark.parametrize("device_map, message", BAD_MAPS, ids=["unknown-module", "unplaced", "tied-split"])
def test_a_map_that_does_not_fit_the_model_is_refused_by_name(hf_checkpoint, device_map, message):
    folder, _ = hf_checkpoint("pre_ln")
    with pytest.raises(ConfigError, match=message):
        OPTForCausalLM.from_pretrained(folder, device_map=device_map)


def test_what_a_dispatched_model_cannot_do_is_refused(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("pre_ln")
    with pytest.raises(ConfigError, match="max_memory applies to device_map='auto'"):
        OPTForCausalLM.from_pretrained(folder, device_map={"": "cpu"}, max_memory={"cpu": 10})
    with pytest.raises(ConfigError, match="int8 weights cannot be dispatched"):
        OPTForCausalLM.from_pretrained(folder, device_map={"": "disk"}, quantize="int8")
    model = OPTForCausalLM.from_pretrained(folder, device_map={"": "disk"})
    with pytest.raises(ConfigError, match="cannot be quantized"):
        model.quantize("int8")
    with pytest.raises(ConfigError, match="adapters on a model dispatched"):
        model.add_adapter({"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="compile=True needs a model on one device"):
        greedy(model, compile=True)
    int8 = OPTForCausalLM.from_pretrained(folder, quantize="int8", device_map="cpu")  # one device: no hooks
    assert int8.is_quantized and not int8.is_dispatched
