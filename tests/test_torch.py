"""opt_torch against HF transformers' PyTorch OPT (the oracle) on every config variant, path and head."""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import HEADS, VARIANTS, assert_close_on_real_tokens, sample_batch

import opt_torch
from opt_core.errors import CheckpointError, InputError

OURS = {
    "base": opt_torch.OPTModel,
    "causal_lm": opt_torch.OPTForCausalLM,
    "sequence_classification": opt_torch.OPTForSequenceClassification,
    "question_answering": opt_torch.OPTForQuestionAnswering,
}


def main_output(out, head):
    """The head's main output(s) as numpy: logits, pooled logits, or stacked start/end logits."""
    if head == "base":
        return out.last_hidden_state.detach().numpy()
    if head == "question_answering":
        return np.stack([out.start_logits.detach().numpy(), out.end_logits.detach().numpy()], -1)
    return out.logits.detach().numpy()


@contextlib.contextmanager
def hf_sdpa(hf):
    """HF's default attention. Its eager path gives a pad slot uniform attention, SDPA (and ours) zero; losses
    differ between the two because a pad slot's logits predict the first real token of a left-padded row."""
    hf.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        hf.set_attn_implementation("eager")


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    cache = {}

    def get(variant, head="causal_lm", attn="sdpa"):
        key = (variant, head, attn)
        if key not in cache:
            folder, hf = hf_checkpoint(variant, head)
            cache[key] = (OURS[head].from_pretrained(folder, attn_implementation=attn), hf)
        return cache[key]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head", HEADS)
def test_full_forward_left_padded_matches_hf(loaded, variant, head):
    ours, hf = loaded(variant, head)
    ids, mask = sample_batch()
    args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        expected, actual = main_output(hf(**args), head), main_output(ours(**args), head)
    if head == "sequence_classification":
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    else:
        assert_close_on_real_tokens(actual, expected, mask)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_rows_equal_rows_alone(loaded, variant, attn):
    ours, _ = loaded(variant, attn=attn)
    ids, mask = sample_batch(seed=1)
    with torch.no_grad():
        batched = ours(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        for row in range(ids.shape[0]):
            real = mask[row].astype(bool)
            alone = ours(torch.from_numpy(ids[row : row + 1, real])).logits.numpy()[0]
            np.testing.assert_allclose(batched[row, real], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_at_random_splits_with_holey_mask(loaded, variant):
    ours, hf = loaded(variant)
    rng = np.random.default_rng(7)
    ids, mask = sample_batch(seed=2, length=12)
    mask[0, 4:6] = 0  # a hole in the middle of a row, not just left padding
    with torch.no_grad():
        full = ours(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        oracle = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        assert_close_on_real_tokens(full, oracle, mask)
        for split in sorted(rng.choice(np.arange(1, 11), size=3, replace=False)):
            out = ours(
                torch.from_numpy(ids[:, :split]), attention_mask=torch.from_numpy(mask[:, :split]), use_cache=True
            )
            pieces, past = [out.logits.numpy()], out.past_key_values
            for t in range(split, ids.shape[1]):  # then one token at a time
                step = ours(
                    torch.from_numpy(ids[:, t : t + 1]),
                    attention_mask=torch.from_numpy(mask[:, : t + 1]),
                    past_key_values=past,
                    use_cache=True,
                )
                pieces.append(step.logits.numpy())
                past = step.past_key_values
            assert_close_on_real_tokens(np.concatenate(pieces, axis=1), full, mask, what=f"split {split}")


def test_past_key_values_layout_is_hfs(loaded):
    ours, _ = loaded("post_ln_proj")
    out = ours(torch.tensor([[5, 6, 7]]), use_cache=True)
    config = ours.config
    assert len(out.past_key_values) == config.num_hidden_layers
    k, v = out.past_key_values[0]
    assert k.shape == v.shape == (1, config.num_attention_heads, 3, config.head_dim)  # B N S H


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_final_norm"])
def test_hidden_states_and_attentions_match_hf(loaded, variant):
    ours, hf = loaded(variant, attn="eager")
    ids, mask = sample_batch(seed=3)
    args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        a = ours(**args, output_hidden_states=True, output_attentions=True)
        e = hf(**args, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(e.hidden_states) == ours.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, e.hidden_states):
        assert_close_on_real_tokens(x.numpy(), y.numpy(), mask, what="hidden_states")
    assert len(a.attentions) == len(e.attentions)
    for x, y in zip(a.attentions, e.attentions):
        real_queries = mask[:, None, :, None].astype(bool) & np.ones(x.shape, bool)
        np.testing.assert_allclose(x.numpy()[real_queries], y.numpy()[real_queries], atol=1e-6)


@pytest.mark.parametrize("variant", ["pre_ln", "untied"])
def test_causal_lm_loss_matches_hf(loaded, variant):
    ours, hf = loaded(variant)
    ids, mask = sample_batch(seed=4)
    labels = np.where(mask == 1, ids, -100)
    args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
    with torch.no_grad(), hf_sdpa(hf):
        assert abs(ours(**args).loss.item() - hf(**args).loss.item()) < 1e-5


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, 2, 1]), torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]])],
    ids=["single_label", "multi_label"],
)
def test_sequence_classification_loss_matches_hf(loaded, labels):
    ours, hf = loaded("pre_ln", "sequence_classification")
    ours.config.problem_type = hf.config.problem_type = None
    ids, mask = sample_batch(seed=5)
    args = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=labels)
    with torch.no_grad(), hf_sdpa(hf):
        assert abs(ours(**args).loss.item() - hf(**args).loss.item()) < 1e-5
    ours.config.problem_type = hf.config.problem_type = None


def test_question_answering_loss_matches_hf(loaded):
    ours, hf = loaded("post_ln_proj", "question_answering")
    ids, mask = sample_batch(seed=6)
    args = dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        start_positions=torch.tensor([1, 4, 30]),  # 30 is outside the sequence: clamped and ignored
        end_positions=torch.tensor([3, 8, 2]),
    )
    with torch.no_grad(), hf_sdpa(hf):
        assert abs(ours(**args).loss.item() - hf(**args).loss.item()) < 1e-5


def test_inputs_embeds_and_explicit_position_ids(loaded):
    ours, hf = loaded("post_ln_proj")
    ids, mask = sample_batch(seed=8)
    embeds = hf.get_input_embeddings()(torch.from_numpy(ids))
    positions = torch.from_numpy(np.clip(np.cumsum(mask, 1) * mask - 1, 0, None))
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask), position_ids=positions).logits
        actual = ours(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask), position_ids=positions).logits
    assert_close_on_real_tokens(actual.numpy(), expected.numpy(), mask)


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


def test_base_checkpoint_gives_fresh_task_head_with_warning(hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln", "causal_lm")
    with pytest.warns(UserWarning, match="score.weight"):
        model = opt_torch.OPTForSequenceClassification.from_pretrained(folder, num_labels=4)
    assert model.score.weight.shape == (4, 32) and model.config.num_labels == 4
    assert model.score.weight.std() > 0


def test_base_model_loads_from_head_checkpoint(hf_checkpoint):
    folder, hf = hf_checkpoint("untied", "causal_lm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = opt_torch.OPTModel.from_pretrained(folder)
    assert any("lm_head.weight" in str(w.message) for w in caught)
    ids, _ = sample_batch(pad_rows=())
    with torch.no_grad():
        expected = hf.model(torch.from_numpy(ids)).last_hidden_state
        assert torch.allclose(model(torch.from_numpy(ids)).last_hidden_state, expected, atol=1e-5)


def test_dtype_options(hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln")
    assert opt_torch.OPTForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert opt_torch.OPTForCausalLM.from_pretrained(folder, torch_dtype="float16").dtype == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype"):
        opt_torch.OPTForCausalLM.from_pretrained(folder, dtype="int8")


# ----- bad input: clear errors naming the problem


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


def test_bad_inputs_raise_clear_errors(loaded):
    ours, _ = loaded("pre_ln")
    with pytest.raises(InputError, match=r"token id 101 at position \(0, 2\) is out of range"):
        ours(torch.tensor([[5, 6, 101]]))
    with pytest.raises(InputError, match="max_position_embeddings=40"):
        ours(torch.full((1, 41), 5))
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 4\)"):
        ours(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(InputError, match="max_position_embeddings"):
        out = ours(torch.full((1, 40), 5), use_cache=True)
        ours(torch.tensor([[5]]), past_key_values=out.past_key_values)
