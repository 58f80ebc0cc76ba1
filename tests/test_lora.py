"""LoRA adapters in PEFT's files, in all three frameworks, against HF PEFT over HF transformers' OPT (the oracle).

Every adapter here has a non-zero `lora_B` (PEFT's `init_lora_weights=False`), so an adapter that is read but not
applied, applied to the wrong module or with the wrong scaling, cannot pass.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import FP32_ATOL, assert_close_on_real_tokens, sample_batch
from frameworks import main_output

from opt_core.adapters import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    LoraConfig,
    from_file_tensors,
    merge_into,
    plan_adapter,
    read_adapter,
)
from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError, ConfigError
from opt_core.safetensors_file import read_safetensors
from opt_core.weights import module_path

# name: (head, PEFT LoraConfig arguments). Between them: q/v (PEFT's default for OPT), a classification head in
# modules_to_save with bias="lora_only", rsLoRA with rank and alpha patterns, "all-linear", QA with bias="all",
# a regex target limited to one layer, and a bare OPTModel (no `model.` level in PEFT's names).
CASES = {
    "q_v": ("causal_lm", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "classifier": (
        "sequence_classification",
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"], bias="lora_only", task_type="SEQ_CLS"),
    ),
    "rslora_patterns": (
        "causal_lm",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["k_proj", "out_proj", "fc2"],
            use_rslora=True,
            rank_pattern={"layers.1.self_attn.k_proj": 2, "fc2": 6},
            alpha_pattern={"out_proj": 3},
        ),
    ),
    "all_linear": ("causal_lm", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "qa_bias_all": ("question_answering", dict(r=2, lora_alpha=4, target_modules=["v_proj", "fc2"], bias="all")),
    "regex": ("causal_lm", dict(r=3, lora_alpha=5, target_modules=r".*layers\.1\.(fc1|self_attn\.q_proj)")),
    "bare_model": ("base", dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], task_type="FEATURE_EXTRACTION")),
}
PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "question_answering": "QUESTION_ANS"}


def peft_logits(model, head, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    if head == "base":
        return out.last_hidden_state.numpy()
    if head == "question_answering":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
    return out.logits.numpy()


def make_peft_adapter(hf_model, folder, head, seed=0, **lora_args):
    """PEFT over a copy of the HF model, with random (non-zero) LoRA tensors and modules_to_save copies
    different from the base; saves it to `folder` and returns the PeftModel."""
    import peft
    import torch

    lora_args.setdefault("task_type", PEFT_TASKS.get(head))
    config = peft.LoraConfig(init_lora_weights=False, **lora_args)
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA pairs, modules_to_save copies, trained biases: all made non-trivial
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def peft_case(hf_checkpoint, tmp_path_factory):
    """peft_case(name) -> (base folder, adapter folder, PEFT's output on sample_batch, PeftModel)."""
    cache = {}

    def get(name):
        if name not in cache:
            head, lora_args = CASES[name]
            base_folder, hf_model = hf_checkpoint("pre_ln", head)
            folder = tmp_path_factory.mktemp(f"peft_{name}")
            model = make_peft_adapter(hf_model, folder, head, **lora_args)
            ids, mask = sample_batch()
            cache[name] = (base_folder, folder, peft_logits(model, head, ids, mask), model)
        return cache[name]

    return get


def run(framework, model, head):
    ids, mask = sample_batch()
    return framework.numpy(main_output(framework(model, ids, attention_mask=mask), head)), mask


# ----- framework-free: the config file and PEFT's module matching


def test_config_round_trip_keeps_peft_keys_it_does_not_use(peft_case, tmp_path):
    _, folder, _, _ = peft_case("q_v")
    written = json.loads((folder / CONFIG_NAME).read_text())
    config = LoraConfig.from_json_file(folder / CONFIG_NAME)
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert json.loads(config.to_json_string()) == written


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_wraps_the_modules_peft_wraps_with_its_scaling(peft_case, name):
    from peft.tuners.lora import LoraLayer

    head, _ = CASES[name]
    base_folder, folder, _, model = peft_case(name)
    plan = plan_adapter(LoraConfig.from_json_file(folder / CONFIG_NAME), OPTConfig.from_pretrained(base_folder), head)
    prefix = "base_model.model."
    wrapped = {
        name.removeprefix(prefix): (layer.r["default"], layer.scaling["default"])
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    ours = {module_path(slot.module, head): (slot.r, slot.scaling) for slot in plan.slots.values()}
    assert ours.keys() == wrapped.keys()
    for module, (r, scaling) in wrapped.items():
        assert ours[module][0] == r and ours[module][1] == pytest.approx(scaling), module


def test_unsupported_adapter_kinds_are_refused_by_name():
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig.from_dict({"r": 8, "use_dora": True})
    with pytest.raises(ConfigError, match="'PREFIX_TUNING'"):
        LoraConfig.from_dict({"peft_type": "PREFIX_TUNING"})
    with pytest.raises(ConfigError, match="'r'"):
        LoraConfig.from_dict({"r": 0})
    with pytest.raises(ConfigError, match="'bias'"):
        LoraConfig(bias="some")


def test_targets_that_match_nothing_or_no_dense_layer_are_clear_errors(hf_checkpoint):
    config = OPTConfig.from_pretrained(hf_checkpoint("pre_ln")[0])
    with pytest.raises(ConfigError, match="match no module"):
        plan_adapter(LoraConfig(target_modules=["query"]), config, "causal_lm")
    with pytest.raises(ConfigError, match="embed_tokens"):
        plan_adapter(LoraConfig(target_modules=["embed_tokens"]), config, "causal_lm")
    with pytest.raises(ConfigError, match="tied"):
        plan_adapter(LoraConfig(target_modules=["lm_head"]), config, "causal_lm")


def test_a_file_that_does_not_match_its_config_names_every_bad_tensor(peft_case, tmp_path):
    base_folder, folder, _, _ = peft_case("q_v")
    tensors = read_safetensors(folder / SAFETENSORS_NAME)
    first_a = "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"
    first_b = first_a.replace("lora_A", "lora_B")
    broken = {k: v for k, v in tensors.items() if k != first_b}
    broken[first_a] = np.zeros((5, 32), np.float32)
    broken["base_model.model.model.decoder.layers.0.fc1.lora_A.weight"] = np.zeros((4, 32), np.float32)
    plan = plan_adapter(
        LoraConfig.from_json_file(folder / CONFIG_NAME), OPTConfig.from_pretrained(base_folder), "causal_lm"
    )
    with pytest.raises(CheckpointError) as error:
        from_file_tensors(plan, broken, "adapter")
    message = str(error.value)
    assert first_b in message and "(5, 32)" in message and "fc1.lora_A" in message


def test_bin_adapters_read_through_the_restricted_unpickler(peft_case, tmp_path):
    import torch

    _, folder, _, _ = peft_case("q_v")
    tensors = read_safetensors(folder / SAFETENSORS_NAME)
    (tmp_path / CONFIG_NAME).write_text((folder / CONFIG_NAME).read_text())
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, tmp_path / BIN_NAME)
    _, read, source = read_adapter(tmp_path)
    assert source.endswith(BIN_NAME) and read.keys() == tensors.keys()
    assert all(np.array_equal(read[k], tensors[k]) for k in tensors)


def test_merge_into_canonical_weights_needs_no_framework(peft_case):
    base_folder, folder, _, model = peft_case("q_v")
    from opt_core.formats import read_checkpoint

    config, file_tensors, source = read_adapter(folder)
    plan = plan_adapter(config, OPTConfig.from_pretrained(base_folder), "causal_lm")
    merged = merge_into(dict(read_checkpoint(base_folder)[1]), plan, from_file_tensors(plan, file_tensors, source))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for name, value in merged.items():
        np.testing.assert_allclose(value, reference[name].numpy(), atol=1e-6, err_msg=name)


def opt_lm(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "opt_cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_cli_merge_writes_a_checkpoint_hf_loads_with_peft_outputs(peft_case, tmp_path):
    import transformers

    base_folder, folder, expected, _ = peft_case("classifier")
    result = opt_lm("merge", "--model", base_folder, "--adapter", folder, "--output", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    merged = transformers.OPTForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids, mask = sample_batch()
    np.testing.assert_allclose(peft_logits(merged, "sequence_classification", ids, mask), expected, atol=FP32_ATOL)


def test_cli_names_a_missing_adapter(tmp_path):
    result = opt_lm("generate", "Hello", "--adapter", tmp_path, "--max-new-tokens", "2")
    assert result.returncode == 2 and f"--adapter: {tmp_path} has no adapter_config.json" in result.stderr
    result = opt_lm("generate", "Hello", "--merge")
    assert result.returncode == 2 and "--merge merges an adapter: pass --adapter too" in result.stderr


# ----- each framework against PEFT


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_adapter_gives_peft_outputs(framework, peft_case, name):
    head, _ = CASES[name]
    base_folder, folder, expected, _ = peft_case(name)
    model = framework.load(base_folder, head)
    model.load_adapter(folder)
    actual, mask = run(framework, model, head)
    if head == "sequence_classification":
        np.testing.assert_allclose(actual, expected, atol=FP32_ATOL)
    else:
        assert_close_on_real_tokens(actual, expected, mask)


def test_from_pretrained_takes_the_adapter(framework, peft_case):
    base_folder, folder, expected, _ = peft_case("classifier")
    model = framework.model_class("sequence_classification").from_pretrained(base_folder, adapter=folder)
    np.testing.assert_allclose(run(framework, model, "sequence_classification")[0], expected, atol=FP32_ATOL)


def test_disable_merge_and_unmerge(framework, peft_case):
    head = "sequence_classification"
    base_folder, folder, expected, _ = peft_case("classifier")
    model = framework.load(base_folder, head)
    base_logits, _ = run(framework, model, head)
    base_state = framework.state(model)
    model.load_adapter(folder)
    adapted, _ = run(framework, model, head)
    np.testing.assert_allclose(adapted, expected, atol=FP32_ATOL)
    model.disable_adapters()
    assert np.array_equal(run(framework, model, head)[0], base_logits)  # the base model, exactly
    model.enable_adapters()
    assert np.array_equal(run(framework, model, head)[0], adapted)
    model.merge_adapter()
    np.testing.assert_allclose(run(framework, model, head)[0], expected, atol=FP32_ATOL)
    model.unmerge_adapter()
    np.testing.assert_allclose(run(framework, model, head)[0], expected, atol=FP32_ATOL)
    unmerged = framework.state(model)
    for name, value in base_state.items():
        # bias="lora_only" trains the wrapped modules' biases in place, as PEFT does: those carry the adapter's.
        if not name.endswith(("q_proj.bias", "v_proj.bias", "fc1.bias")):
            np.testing.assert_allclose(unmerged[name], value, atol=1e-6, err_msg=name)


def test_two_adapters_switch_by_name(framework, peft_case):
    base_folder, folder_a, expected_a, _ = peft_case("q_v")
    _, folder_b, expected_b, _ = peft_case("regex")
    model = framework.load(base_folder)
    model.load_adapter(folder_a, adapter_name="a")
    model.load_adapter(folder_b, adapter_name="b")
    model.set_adapter("a")
    actual, mask = run(framework, model, "causal_lm")
    assert_close_on_real_tokens(actual, expected_a, mask)
    model.set_adapter("b")
    actual, mask = run(framework, model, "causal_lm")
    assert_close_on_real_tokens(actual, expected_b, mask)
    with pytest.raises(ValueError, match="'c'"):
        model.set_adapter("c")


@pytest.mark.parametrize("name", ["classifier", "rslora_patterns"])
def test_saved_adapter_is_peft_file_again_and_loads_in_peft(framework, peft_case, name, tmp_path):
    import peft

    head, _ = CASES[name]
    base_folder, folder, expected, peft_model = peft_case(name)
    model = framework.load(base_folder, head)
    model.load_adapter(folder)
    model.save_adapter(tmp_path)
    original, saved = read_safetensors(folder / SAFETENSORS_NAME), read_safetensors(tmp_path / SAFETENSORS_NAME)
    assert set(saved) <= set(original)  # PEFT's bias="all" duplicates aside, the same names
    for key, value in saved.items():
        assert np.array_equal(value, original[key]), key
    base = copy.deepcopy(peft_model.get_base_model())
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path)  # PEFT restores the wrapped model's state itself
    ids, mask = sample_batch()
    np.testing.assert_allclose(peft_logits(reloaded.eval(), head, ids, mask), expected, atol=FP32_ATOL)


def test_new_adapter_trains_only_itself_and_loads_in_peft(framework, hf_checkpoint, tmp_path):
    import peft

    base_folder, hf_model = hf_checkpoint("pre_ln", "causal_lm")
    model = framework.load(base_folder)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc2"], init_lora_weights=False)
    model.add_adapter(config)
    counts = model.trainable_parameters()
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**json.loads(config.to_json_string())))
    assert tuple(counts) == tuple(peft_model.get_nb_trainable_parameters())
    assert str(counts).startswith(f"trainable params: {counts.trainable:,d} || all params:")
    actual, mask = run(framework, model, "causal_lm")
    model.save_adapter(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    ids, _ = sample_batch()
    assert_close_on_real_tokens(actual, peft_logits(reloaded, "causal_lm", ids, mask), mask)
