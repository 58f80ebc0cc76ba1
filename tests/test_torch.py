"""What only opt_torch has, against HF transformers' PyTorch OPT (the oracle): HF's past_key_values, folders HF
writes and reads (fp16 .bin, sharded safetensors), torch's dtype alias, named checkpoint errors. The checks every
framework passes the same way (every variant, path and head) are in `test_frameworks.py`."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import assert_close_on_real_tokens, sample_batch

import opt_torch
from opt_core.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    """loaded(variant) -> (our causal LM loaded from the folder HF wrote, the HF torch model)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            folder, hf = hf_checkpoint(variant)
            cache[variant] = (opt_torch.OPTForCausalLM.from_pretrained(folder), hf)
        return cache[variant]

    return get


def test_past_key_values_layout_is_hfs(loaded):
    ours, _ = loaded("post_ln_proj")
    out = ours(torch.tensor([[5, 6, 7]]), use_cache=True)
    config = ours.config
    assert len(out.past_key_values) == config.num_hidden_layers
    k, v = out.past_key_values[0]
    assert k.shape == v.shape == (1, config.num_attention_heads, 3, config.head_dim)  # B N S H


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
def test_static_cache_steps_by_hand_as_generate_does(loaded, variant):
    """init_cache + cache_position + a mask over every slot: the same logits as the whole sequence uncached."""
    ours, _ = loaded(variant)
    ids, mask = sample_batch(length=9)
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).logits
        cache = ours.init_cache(ids.shape[0], 12)
        slots = torch.zeros(ids.shape[0], 12, dtype=torch.long)
        slots[:, :6] = mask[:, :6]
        first = ours(ids[:, :6], slots, past_key_values=cache, cache_position=torch.arange(6)).logits
        steps = [first]
        for t in range(6, 9):
            slots[:, t] = mask[:, t]
            out = ours(ids[:, t : t + 1], slots, past_key_values=cache, cache_position=torch.tensor([t]))
            steps.append(out.logits)
    assert out.past_key_values is cache
    assert_close_on_real_tokens(torch.cat(steps, 1).numpy(), expected.numpy(), mask.numpy())


def test_static_cache_bad_inputs_raise_clear_errors(loaded):
    ours, _ = loaded("pre_ln")
    cache = ours.init_cache(1, 4)
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 2\), but .*cache of 4 .*\(1, 4\)"):
        ours(torch.tensor([[5, 6]]), torch.ones(1, 2), past_key_values=cache, cache_position=torch.arange(2))
    with pytest.raises(InputError, match="cache was made for a batch of 1"):
        ours(torch.tensor([[5], [6]]), torch.ones(2, 4), past_key_values=cache, cache_position=torch.arange(1))
    with pytest.raises(InputError, match="no room for 2 more tokens"):
        ours(torch.tensor([[5, 6]]), torch.ones(1, 4), past_key_values=cache, cache_position=torch.arange(3, 5))


# ----- checkpoints: HF folders load here, ours load in HF, bit-exact


def hub_style_folder(tmp_path, variant="pre_ln"):
    """A folder as on the Hub: HF `OPTModel` keys (`decoder.*`) in fp16, pytorch_model.bin, no lm_head."""
    from conftest import make_hf_model

    base = make_hf_model(variant, "base").half()
    base.config.save_pretrained(tmp_path)
    torch.save(base.state_dict(), tmp_path / "pytorch_model.bin")  # what the Hub's opt-* repos hold
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["OPTForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, base


def test_hub_style_fp16_opt_model_folder_loads(tmp_path):
    folder, base = hub_style_folder(tmp_path)
    assert any(p.name.endswith(".bin") for p in folder.iterdir())
    ours = opt_torch.OPTForCausalLM.from_pretrained(folder)
    assert ours.dtype == torch.float32  # the default computes in fp32 whatever the checkpoint stores
    assert opt_torch.OPTForCausalLM.from_pretrained(folder, dtype="auto").dtype == torch.float16
    hf = transformers.OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = sample_batch(seed=9)
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        actual = ours(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert_close_on_real_tokens(actual, expected, mask, atol=2e-5)
    assert torch.equal(
        ours.model.decoder.embed_tokens.weight, base.decoder.embed_tokens.weight.float()
    )  # fp16 -> fp32 is exact


@pytest.mark.parametrize("variant", ["post_ln_proj", "untied"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_saved_folder_loads_in_hf_bit_exact(loaded, tmp_path, variant, safe):
    ours, _ = loaded(variant)
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path).eval()
    theirs = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    back = opt_torch.OPTForCausalLM.from_pretrained(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_sharded_save_round_trip_and_hf_load(loaded, tmp_path):
    ours, _ = loaded("pre_ln")
    files = ours.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(files) > 2
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = sample_batch()
    with torch.no_grad():
        expected = ours(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        assert torch.equal(hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits, expected)
        back = opt_torch.OPTForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(back(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits, expected)


def test_torch_dtype_is_an_alias_of_dtype(hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln")
    assert opt_torch.OPTForCausalLM.from_pretrained(folder, torch_dtype="float16").dtype == torch.float16


# ----- bad checkpoints: clear errors naming the problem


def test_mis_shaped_tensor_is_named(tmp_path, hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config["ffn_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.0\.fc1\.weight: file has shape \(48, 32\)"):
        opt_torch.OPTForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_is_named(tmp_path, hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        opt_torch.OPTForCausalLM.from_pretrained(tmp_path)
