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
    # PEFT writes target_modules from a set: its order varies with the hash seed.
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 8, ["q_proj", "v_proj"])
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


# ----- torch: generation (eager and compiled), bfloat16, biases of several adapters, unloading, the trainer


def torch_greedy(model, compile=False):
    import torch

    ids, mask = sample_batch(seed=3, length=6)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, compile=compile).numpy()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torch_greedy_generate_applies_the_adapter_merged_or_not(peft_case, compile):
    """The static-cache decode loop (and its torch.compile'd step, recompiled as adapters change) applies the
    active adapter: PEFT's ids unmerged, the same after merge_adapter, the base's once disabled."""
    import torch

    import opt_torch

    base_folder, folder, _, peft_model = peft_case("all_linear")
    model = opt_torch.OPTForCausalLM.from_pretrained(base_folder)
    base_ids = torch_greedy(model, compile)
    model.load_adapter(folder)
    ids, mask = sample_batch(seed=3, length=6)
    with torch.no_grad():
        expected = peft_model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8, do_sample=False
        ).numpy()
    unmerged = torch_greedy(model, compile)
    np.testing.assert_array_equal(unmerged, expected)
    assert not np.array_equal(unmerged, base_ids)
    model.merge_adapter()
    np.testing.assert_array_equal(torch_greedy(model, compile), unmerged)
    model.disable_adapters()  # unmerges first
    np.testing.assert_array_equal(torch_greedy(model, compile), base_ids)


def test_torch_bf16_base_keeps_float32_lora_tensors(peft_case):
    import ml_dtypes
    import torch
    from frameworks import TorchAdapter

    base_folder, folder, expected, _ = peft_case("q_v")
    model = TorchAdapter().load(base_folder, dtype=torch.bfloat16, adapter=folder)
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert lora_dtypes == {torch.float32}
    state = model.canonical_state()
    assert {v.dtype for v in state.values()} == {np.dtype(ml_dtypes.bfloat16)} and not any("lora" in n for n in state)
    framework, (ids, mask) = TorchAdapter(), sample_batch()
    actual = framework.numpy(framework(model, ids, attention_mask=mask).logits)
    assert actual.dtype == ml_dtypes.bfloat16
    assert_close_on_real_tokens(actual.astype(np.float32), expected, mask, atol=5e-2)


def test_torch_adapters_keep_their_own_biases_and_deleting_them_gives_the_base_back(peft_case):
    """Trained biases live in the base biases while their adapter acts (as PEFT), but each adapter keeps its own:
    switching adapters and deleting them gives each its values and the base model back bit for bit."""
    import torch
    from frameworks import TorchAdapter

    from opt_torch.lora import is_adapter_name

    framework, head = TorchAdapter(), "sequence_classification"
    base_folder, folder, expected, _ = peft_case("classifier")
    model = framework.load(base_folder, head)
    base_state, (base_logits, _) = model.canonical_state(), run(framework, model, head)
    model.load_adapter(folder, adapter_name="peft")
    model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"], bias="all", init_lora_weights=False), "new")
    assert model.active_adapter == "new" and list(model.peft_config) == ["peft", "new"]
    with torch.no_grad():
        for param in model.adapter_parameters().values():  # as if trained: LoRA pairs, the score copy, every bias
            param.add_(0.01)
    new_logits, _ = run(framework, model, head)
    model.set_adapter("peft")
    np.testing.assert_allclose(run(framework, model, head)[0], expected, atol=FP32_ATOL)
    model.set_adapter("new")
    assert np.array_equal(run(framework, model, head)[0], new_logits)
    with pytest.raises(ValueError, match="'new'"):
        model.add_adapter(LoraConfig(), adapter_name="new")
    model.delete_adapter("new")
    assert model.active_adapter == "peft"
    np.testing.assert_allclose(run(framework, model, head)[0], expected, atol=FP32_ATOL)
    model.delete_adapter("peft")
    assert model.active_adapter is None and model.peft_config == {}
    assert all(np.array_equal(value, base_state[name]) for name, value in model.canonical_state().items())
    assert np.array_equal(run(framework, model, head)[0], base_logits)
    assert all(not is_adapter_name(name) and p.requires_grad for name, p in model.named_parameters())


def test_torch_merge_and_unload_leaves_a_plain_model_hf_loads(peft_case, tmp_path):
    import torch
    import transformers
    from frameworks import TorchAdapter

    head = "sequence_classification"
    base_folder, folder, expected, _ = peft_case("classifier")
    model = TorchAdapter().load(base_folder, head, adapter=folder)
    plain_names = list(TorchAdapter().load(base_folder, head).state_dict())
    assert model.merge_and_unload() is model and model.peft_config == {}
    assert list(model.state_dict()) == plain_names
    assert {type(m) for m in model.modules()} <= {type(m) for m in TorchAdapter().load(base_folder, head).modules()}
    np.testing.assert_allclose(run(TorchAdapter(), model, head)[0], expected, atol=FP32_ATOL)
    model.save_pretrained(tmp_path)
    hf = transformers.OPTForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = sample_batch()
    np.testing.assert_allclose(peft_logits(hf, head, ids, mask), expected, atol=FP32_ATOL)


def test_torch_trainer_updates_only_the_adapter_and_saves_it_as_peft_does(hf_checkpoint, tmp_path):
    """TorchTrainer's AdamW holds only what requires grad (the adapter's LoRA pairs, score copy and trained
    biases); the base stays as loaded; a checkpoint is PEFT's adapter folder, which PEFT and a resumed trainer read."""
    import peft
    from frameworks import TorchAdapter

    from opt_core.adapters import read_adapter
    from opt_core.training import TrainOptions
    from opt_torch.train import TorchTrainer

    head = "sequence_classification"
    base_folder, hf_model = hf_checkpoint("pre_ln", head)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], bias="lora_only")

    def trainer():
        model = TorchAdapter().load(base_folder, head)
        model.add_adapter(config, seed=1)
        options = TrainOptions([tmp_path / "unused.txt"], tmp_path / "out", learning_rate=1e-2, dropout=False)
        return TorchTrainer(model, options, device="cpu")

    first = trainer()
    model = first.model
    plan = model.adapter_state.plans["default"]
    assert set(first.params) == set(plan.shapes()) | set(plan.saved)
    frozen = {n: v for n, v in model.canonical_state().items() if n not in plan.trained_biases}
    before = {n: v.detach().clone() for n, v in first.params.items()}
    ids, mask = sample_batch()
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": np.array([[0, 1, 2]])}
    for step in range(2):
        first.train_step(batch, 1e-2, step)
    assert all(np.array_equal(model.canonical_state()[n], v) for n, v in frozen.items())
    assert all(not np.array_equal(p.detach(), before[n]) for n, p in first.params.items())

    first.save(tmp_path / "ckpt", {"extra.txt": b"kept"})
    assert (tmp_path / "ckpt" / "extra.txt").read_bytes() == b"kept"
    _, tensors, _ = read_adapter(tmp_path / "ckpt")
    assert all(np.array_equal(tensors[plan.file_name(n)], v) for n, v in model.adapter_arrays()[1].items())
    ours, mask = run(TorchAdapter(), model.eval(), head)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "ckpt").eval()
    np.testing.assert_allclose(peft_logits(reloaded, head, ids, mask), ours, atol=FP32_ATOL)

    second = trainer()
    second.restore(tmp_path / "ckpt", first.optimizer_state())
    np.testing.assert_array_equal(run(TorchAdapter(), second.model.eval(), head)[0], ours)


# ----- flax: the adapter in the params pytree (one jit follows it), generate's merged decode view, bfloat16, the
# optax mask and trainer, a device mesh


def flax_logits(model, head):
    """The head's main output through one `jax.jit(model.__call__)` per model, as JAX users call it."""
    from frameworks import FlaxAdapter

    framework = FlaxAdapter()
    ids, mask = sample_batch()
    step = framework.decode_step(model)  # jax.jit(model.__call__) made once, called with params=model.params
    return main_output(step(ids, attention_mask=mask), head)


def test_flax_one_jitted_call_follows_the_adapters_in_the_params(peft_case):
    """The active adapter lives in `model.params`: a function jitted once applies whichever adapter the params it
    is given hold, so switching, disabling and deleting adapters are never baked into a trace; the other adapters'
    tensors (and their own trained biases) wait outside the params, and the base comes back bit for bit."""
    import jax

    from opt_flax import FlaxOPTForSequenceClassification
    from opt_flax.lora import is_adapter_key, trainable_mask

    head = "sequence_classification"
    base_folder, folder, expected, _ = peft_case("classifier")
    model = FlaxOPTForSequenceClassification.from_pretrained(base_folder)
    base_logits, base_state = flax_logits(model, head), model.canonical_state()
    model.load_adapter(folder, adapter_name="peft")
    np.testing.assert_allclose(flax_logits(model, head), expected, atol=FP32_ATOL)
    model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"], bias="all", init_lora_weights=False), "new")
    assert model.active_adapter == "new" and list(model.peft_config) == ["peft", "new"]
    as_if_trained = lambda p, trained: p + 0.01 if trained else p  # noqa: E731
    model.params = jax.tree.map(as_if_trained, model.params, trainable_mask(model.params))
    new_logits = flax_logits(model, head)
    state = model.canonical_state()  # the trained biases stand in for the base's, as in PEFT; nothing else does
    assert all(np.array_equal(v, base_state[n]) != n.endswith(".bias") for n, v in state.items())
    model.set_adapter("peft")
    np.testing.assert_allclose(flax_logits(model, head), expected, atol=FP32_ATOL)
    model.disable_adapters()
    assert np.array_equal(flax_logits(model, head), base_logits)
    assert not any(map(is_adapter_key, flatten_dict(model.params, sep="/")))
    model.enable_adapters()
    model.set_adapter("new")
    assert np.array_equal(flax_logits(model, head), new_logits)
    model.delete_adapter("new")
    assert model.active_adapter == "peft"
    np.testing.assert_allclose(flax_logits(model, head), expected, atol=FP32_ATOL)
    model.delete_adapter("peft")
    assert model.active_adapter is None and model.peft_config == {}
    assert all(np.array_equal(value, base_state[name]) for name, value in model.canonical_state().items())
    assert np.array_equal(flax_logits(model, head), base_logits)
    assert not any(map(is_adapter_key, flatten_dict(model.params, sep="/")))


def flatten_dict(tree, sep):
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree, sep=sep)


@pytest.mark.parametrize("decode_layout", [True, False], ids=["merged_decode_view", "lora_branch"])
def test_flax_greedy_generate_applies_the_adapter_merged_or_not(peft_case, monkeypatch, decode_layout):
    """generate's compiled loop applies the active adapter: PEFT's ids unmerged, whether the decode layout pays
    (the adapter merged into that [out, in] view) or not (the LoRA branch in each layer); the same ids after
    merge_adapter; the base's once disabled."""
    import torch

    import opt_flax.decode_layout
    from opt_flax import FlaxOPTForCausalLM

    monkeypatch.setattr(opt_flax.decode_layout, "decode_layout_pays", lambda *args, **kwargs: decode_layout)
    base_folder, folder, _, peft_model = peft_case("all_linear")
    model = FlaxOPTForCausalLM.from_pretrained(base_folder)
    ids, mask = sample_batch(seed=3, length=6)
    greedy = lambda: model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # noqa: E731
    base_ids = greedy()
    model.load_adapter(folder)
    with torch.no_grad():
        expected = peft_model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8, do_sample=False
        ).numpy()
    unmerged = greedy()
    np.testing.assert_array_equal(unmerged, expected)
    assert not np.array_equal(unmerged, base_ids)
    model.merge_adapter()
    np.testing.assert_array_equal(greedy(), unmerged)
    model.disable_adapters()  # unmerges first
    np.testing.assert_array_equal(greedy(), base_ids)


def test_flax_bf16_base_keeps_float32_lora_tensors_and_merges_in_bf16(peft_case, tmp_path):
    import jax
    import ml_dtypes

    from opt_flax import FlaxOPTForCausalLM

    base_folder, folder, expected, _ = peft_case("q_v")
    model = FlaxOPTForCausalLM.from_pretrained(base_folder, dtype="bfloat16", param_dtype="bfloat16", adapter=folder)
    q_proj = model.params["model"]["decoder"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q_proj["lora_A"]["kernel"].dtype == q_proj["lora_B"]["kernel"].dtype == np.float32
    assert q_proj["kernel"].dtype == ml_dtypes.bfloat16
    state = model.canonical_state()
    assert {v.dtype for v in state.values()} == {np.dtype(ml_dtypes.bfloat16)} and not any("lora" in n for n in state)
    actual = flax_logits(model, "causal_lm")
    assert actual.dtype == ml_dtypes.bfloat16
    assert_close_on_real_tokens(actual.astype(np.float32), expected, sample_batch()[1], atol=5e-2)
    model.merge_and_unload()
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {np.dtype(ml_dtypes.bfloat16)}
    model.save_pretrained(tmp_path)
    merged = FlaxOPTForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert np.array_equal(flax_logits(merged, "causal_lm"), flax_logits(model, "causal_lm"))


def test_flax_trainer_updates_only_the_adapter_and_saves_it_as_peft_does(hf_checkpoint, tmp_path):
    """FlaxTrainer's optax update is masked by `trainable_mask`: the LoRA pairs, the score copy and the trained
    biases move, every other leaf stays bit for bit and has no optimizer state; a checkpoint is PEFT's adapter
    folder, which PEFT and a resumed trainer read."""
    import jax
    import peft
    from frameworks import FlaxAdapter

    from opt_core.adapters import read_adapter
    from opt_core.training import TrainOptions
    from opt_flax.train import FlaxTrainer

    head = "sequence_classification"
    base_folder, hf_model = hf_checkpoint("pre_ln", head)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], bias="lora_only")

    def trainer():
        model = FlaxAdapter().load(base_folder, head)
        model.add_adapter(config, seed=1)
        options = TrainOptions([tmp_path / "unused.txt"], tmp_path / "out", learning_rate=1e-2, dropout=False)
        return FlaxTrainer(model, options)

    first = trainer()
    # A copy: the train step donates (consumes) the params it is given.
    model, before, trained = first.model, jax.tree.map(np.array, first.params), jax.tree.leaves(first.mask)
    assert sum(trained) == 4 * 2 + 1 + 2 * 2  # q_proj, fc1 x (A, B) x 2 layers, the score copy, their biases
    ids, mask = sample_batch()
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": np.array([[0, 1, 2]])}
    for step in range(2):
        first.train_step(batch, 1e-2, step)
    for old, new, moves in zip(jax.tree.leaves(before), jax.tree.leaves(first.params), trained):
        assert np.array_equal(old, new) != moves
    trained_size = sum(leaf.size for leaf, t in zip(jax.tree.leaves(before), trained) if t)
    assert sum(np.size(leaf) for leaf in jax.tree.leaves(first.opt_state)) < 2 * trained_size + 10  # Adam: mu, nu

    first.save(tmp_path / "ckpt", {"extra.txt": b"kept"})
    assert (tmp_path / "ckpt" / "extra.txt").read_bytes() == b"kept"
    plan, arrays = model.adapter_arrays()
    _, tensors, _ = read_adapter(tmp_path / "ckpt")
    assert all(np.array_equal(tensors[plan.file_name(n)], v) for n, v in arrays.items())
    ours, mask = run(FlaxAdapter(), model, head)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "ckpt").eval()
    np.testing.assert_allclose(peft_logits(reloaded, head, ids, mask), ours, atol=FP32_ATOL)

    second = trainer()
    second.restore(tmp_path / "ckpt", first.optimizer_state())
    np.testing.assert_array_equal(run(FlaxAdapter(), second.model, head)[0], ours)


FLAX_MESH_SCRIPT = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from flax.traverse_util import flatten_dict

jax.config.update("jax_default_matmul_precision", "highest")
from opt_core.adapters import LoraConfig
from opt_flax import FlaxOPTForCausalLM, OPTConfig
from opt_flax.sharding import make_mesh, shard_params

mesh = make_mesh(model=4)  # 2 data x 4 model
config = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=40)
lora = LoraConfig(r=4, target_modules=["q_proj", "out_proj", "fc1", "fc2"], bias="lora_only", init_lora_weights=False)
ids = np.random.default_rng(0).integers(3, 128, size=(4, 8)).astype(np.int32)
model = FlaxOPTForCausalLM(config)
model.add_adapter(lora)
forward = jax.jit(model.__call__)
single = np.asarray(forward(ids, params=model.params).logits)
expected = {  # lora_A [in, r] split like the kernel's input dim, lora_B [r, out] like its output dim
    "self_attn/q_proj/lora_A/kernel": P(), "self_attn/q_proj/lora_B/kernel": P(None, "model"),
    "self_attn/out_proj/lora_A/kernel": P("model", None), "self_attn/out_proj/lora_B/kernel": P(),
    "fc1/trained_bias": P("model"), "fc2/trained_bias": P(), "fc2/lora_scaling": P(),
}
sharded = shard_params(model.params, mesh, config)
folder = __import__("tempfile").mkdtemp()
model.save_pretrained(folder)
loaded = FlaxOPTForCausalLM.from_pretrained(folder, mesh=mesh)
loaded.add_adapter(lora)  # placed on the mesh as it is made
for params in (sharded, loaded.params):
    flat = flatten_dict(params, sep="/")
    for key, spec in expected.items():
        assert flat["model/decoder/layers/0/" + key].sharding.spec == spec, key
    worst = float(np.abs(np.asarray(forward(ids, params=params).logits) - single).max())
    assert worst < 1e-5, worst
print("adapter sharded")
"""


def test_flax_adapter_leaves_are_sharded_like_their_kernels():
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(repo),
    }
    command = [sys.executable, "-c", textwrap.dedent(FLAX_MESH_SCRIPT)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "adapter sharded" in result.stdout, result.stdout + result.stderr


# ----- tf: adapters as Keras variables (trainable_weights, fit), generate's decode layout and compiled programs,
# norms and embeddings in modules_to_save, bfloat16, the trainer


def tf_greedy(model):
    ids, mask = sample_batch(seed=3, length=6)
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)


def peft_greedy(peft_model):
    import torch

    ids, mask = sample_batch(seed=3, length=6)
    with torch.no_grad():
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
        return peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False).numpy()


@pytest.mark.parametrize("decode_layout", [True, False], ids=["adapted_decode_layout", "lora_branch"])
def test_tf_greedy_generate_applies_the_adapter_merged_or_not(peft_case, monkeypatch, decode_layout):
    """generate's XLA programs apply the active adapter: PEFT's ids unmerged, whether they read the [out, in]
    decode layout (rebuilt from the adapted kernels before every call) or the layers add the LoRA branch; the same
    ids after merge_adapter; and no program or layout outlives the adapter state it was made for (another adapter,
    disabled, deleted and loaded again under the same name)."""
    from opt_tf import TFOPTForCausalLM
    from opt_tf.decode_layout import DecodeLayout

    monkeypatch.setattr(DecodeLayout, "pays", staticmethod(lambda layers, rows: decode_layout))
    base_folder, folder, _, peft_model = peft_case("all_linear")
    _, other_folder, _, other_peft = peft_case("q_v")
    model = TFOPTForCausalLM.from_pretrained(base_folder)
    base_ids = tf_greedy(model)
    model.load_adapter(folder)
    unmerged = tf_greedy(model)
    np.testing.assert_array_equal(unmerged, peft_greedy(peft_model))
    assert not np.array_equal(unmerged, base_ids)
    model.merge_adapter()
    np.testing.assert_array_equal(tf_greedy(model), unmerged)
    model.load_adapter(other_folder, adapter_name="other")  # unmerges the first one
    other = tf_greedy(model)
    np.testing.assert_array_equal(other, peft_greedy(other_peft))
    assert not np.array_equal(other, unmerged)
    model.disable_adapters()
    np.testing.assert_array_equal(tf_greedy(model), base_ids)
    model.enable_adapters()
    model.set_adapter("default")
    np.testing.assert_array_equal(tf_greedy(model), unmerged)
    model.delete_adapter("default")
    np.testing.assert_array_equal(tf_greedy(model), other)
    model.load_adapter(folder)  # a new "default": new variables, so a new program
    np.testing.assert_array_equal(tf_greedy(model), unmerged)


def test_tf_trainable_weights_are_the_adapter_and_fit_trains_only_them(hf_checkpoint, tmp_path):
    """keras-hub's idiom: add_adapter freezes the base variables, so `model.trainable_weights` are exactly the
    adapter's tensors (LoRA pairs, the score copy, the biases bias="lora_only" trains) and compile + fit trains
    only them; lora_dropout acts in training only; canonical_state and save_pretrained (tf_model.h5) keep the
    base's names."""
    import h5py
    import keras

    from opt_core.weights import parameter_specs
    from opt_tf import TFOPTForSequenceClassification

    head = "sequence_classification"
    base_folder, _ = hf_checkpoint("pre_ln", head)
    model = TFOPTForSequenceClassification.from_pretrained(base_folder)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "fc1"], bias="lora_only", lora_dropout=0.2, init_lora_weights=False
    )
    model.add_adapter(lora)
    adapter, plan = model.adapter_variables(), model.adapter_plan()
    assert set(adapter) == set(plan.shapes()) | set(plan.saved) and "score.weight" in adapter
    assert {id(v) for v in model.trainable_weights} == {id(v) for v in adapter.values()}
    sizes = [int(np.prod(v.shape)) for v in adapter.values()]
    assert tuple(model.trainable_parameters()) == (sum(sizes), sum(int(np.prod(v.shape)) for v in model.weights))
    assert {v.dtype for n, v in adapter.items() if ".lora_" in n} == {"float32"}

    ids, mask = sample_batch()
    inputs = {"input_ids": ids, "attention_mask": mask}
    np.testing.assert_array_equal(model(inputs).logits, model(inputs).logits)
    assert not np.allclose(model(inputs, training=True).logits, model(inputs).logits)

    base = model.canonical_state()
    before = {name: variable.numpy().copy() for name, variable in adapter.items()}
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit({**inputs, "labels": np.array([0, 1, 2])}, batch_size=3, epochs=2, verbose=0)
    assert all(not np.array_equal(variable.numpy(), before[name]) for name, variable in adapter.items())
    after = model.canonical_state()
    assert list(after) == [spec.name for spec in parameter_specs(model.config, head)]
    changed = {name for name, value in after.items() if not np.array_equal(value, base[name])}
    assert changed == set(plan.trained_biases)

    model.save_pretrained(tmp_path)  # tf_model.h5
    with h5py.File(tmp_path / "tf_model.h5") as file:
        names = []
        file.visit(names.append)
    assert names and not any("lora" in name or "default" in name for name in names)
    reloaded = TFOPTForSequenceClassification.from_pretrained(tmp_path)
    assert all(np.array_equal(value, after[name]) for name, value in reloaded.canonical_state().items())


def test_tf_norms_and_embeddings_in_modules_to_save_act_as_in_peft(hf_checkpoint, tmp_path):
    """modules_to_save layers that are Keras' own (layer norms, the position table) read the active adapter's
    copies in their call, in the model and in generate's programs; disabled, the originals, bit for bit."""
    from frameworks import TFAdapter

    from opt_core.safetensors_file import read_safetensors

    base_folder, hf_model = hf_checkpoint("pre_ln")
    modules = ["final_layer_norm", "embed_positions"]
    peft_model = make_peft_adapter(
        hf_model, tmp_path / "peft", "causal_lm", r=2, target_modules=["q_proj"], modules_to_save=modules
    )
    ids, mask = sample_batch()
    framework = TFAdapter()
    model = framework.load(base_folder)
    base_logits, base_ids = run(framework, model, "causal_lm")[0], tf_greedy(model)
    model.load_adapter(tmp_path / "peft")
    assert any("embed_positions" in name for name in model.adapter_plan().module_copies)
    actual, mask = run(framework, model, "causal_lm")
    assert_close_on_real_tokens(actual, peft_logits(peft_model, "causal_lm", ids, mask), mask)
    np.testing.assert_array_equal(tf_greedy(model), peft_greedy(peft_model))
    model.disable_adapters()
    assert np.array_equal(run(framework, model, "causal_lm")[0], base_logits)
    np.testing.assert_array_equal(tf_greedy(model), base_ids)
    model.save_adapter(tmp_path / "ours")
    original = read_safetensors(tmp_path / "peft" / SAFETENSORS_NAME)
    saved = read_safetensors(tmp_path / "ours" / SAFETENSORS_NAME)
    assert saved.keys() == original.keys()
    assert all(np.array_equal(saved[k], original[k]) for k in saved)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_tf_bf16_keeps_float32_lora_variables_and_merges_in_the_kernel_dtype(peft_case, policy, tmp_path, monkeypatch):
    import ml_dtypes

    from opt_tf import TFOPTForCausalLM
    from opt_tf.decode_layout import DecodeLayout

    monkeypatch.setattr(DecodeLayout, "pays", staticmethod(lambda layers, rows: True))  # at this batch, too

    base_folder, folder, expected, _ = peft_case("q_v")
    model = TFOPTForCausalLM.from_pretrained(base_folder, dtype=policy, adapter=folder)
    adapter = model.adapter_variables()
    assert {v.dtype for v in adapter.values()} == {"float32"}
    variable_dtype = np.float32 if policy.startswith("mixed") else ml_dtypes.bfloat16
    state = model.canonical_state()
    assert {v.dtype for v in state.values()} == {np.dtype(variable_dtype)} and not any("lora" in n for n in state)
    ids, mask = sample_batch()
    actual = np.asarray(model(ids, attention_mask=mask).logits)
    assert actual.dtype == ml_dtypes.bfloat16
    assert_close_on_real_tokens(actual.astype(np.float32), expected, mask, atol=5e-2)
    greedy = tf_greedy(model)  # the adapted decode layout is the merged kernels, in their dtype
    model.merge_adapter()
    np.testing.assert_array_equal(tf_greedy(model), greedy)
    model.merge_and_unload()
    assert model.active_adapter is None and {v.dtype for v in model.canonical_state().values()} == {
        np.dtype(variable_dtype)
    }
    merged = np.asarray(model(ids, attention_mask=mask).logits).astype(np.float32)
    assert_close_on_real_tokens(merged, expected, mask, atol=5e-2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = TFOPTForCausalLM.from_pretrained(tmp_path, dtype=policy)
    np.testing.assert_array_equal(np.asarray(reloaded(ids, attention_mask=mask).logits).astype(np.float32), merged)


def test_tf_trainer_updates_only_the_adapter_and_saves_it_as_peft_does(hf_checkpoint, tmp_path):
    """TFTrainer's compiled step and AdamW see only `model.trainable_variables` (the adapter's LoRA pairs, score
    copy and trained biases), keyed by canonical adapter names; the base stays as loaded; a checkpoint is PEFT's
    adapter folder, which PEFT and a resumed trainer read."""
    import peft
    from frameworks import TFAdapter

    from opt_core.adapters import read_adapter
    from opt_core.training import TrainOptions
    from opt_tf.train import TFTrainer, trained_variables

    head = "sequence_classification"
    base_folder, hf_model = hf_checkpoint("pre_ln", head)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], bias="lora_only")

    def trainer():
        model = TFAdapter().load(base_folder, head)
        model.add_adapter(config, seed=1)
        options = TrainOptions([tmp_path / "unused.txt"], tmp_path / "out", learning_rate=1e-2, dropout=False)
        return TFTrainer(model, options, jit_compile=False)

    first = trainer()
    model, plan = first.model, first.model.adapter_plan()
    trained = trained_variables(model)
    assert set(trained) == set(plan.shapes()) | set(plan.saved)
    assert {id(v) for v in trained.values()} == {id(v) for v in model.trainable_variables}
    frozen = {n: v for n, v in model.canonical_state().items() if n not in plan.trained_biases}
    before = {n: v.numpy().copy() for n, v in trained.items()}
    ids, mask = sample_batch()
    batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": np.array([[0, 1, 2]])}
    for step in range(2):
        first.train_step(batch, 1e-2, step)
    assert all(np.array_equal(model.canonical_state()[n], v) for n, v in frozen.items())
    assert all(not np.array_equal(v.numpy(), before[n]) for n, v in trained.items())

    first.save(tmp_path / "ckpt", {"extra.txt": b"kept"})
    assert (tmp_path / "ckpt" / "extra.txt").read_bytes() == b"kept"
    _, tensors, _ = read_adapter(tmp_path / "ckpt")
    assert all(np.array_equal(tensors[plan.file_name(n)], v) for n, v in model.adapter_arrays()[1].items())
    ours, mask = run(TFAdapter(), model, head)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "ckpt").eval()
    np.testing.assert_allclose(peft_logits(reloaded, head, ids, mask), ours, atol=FP32_ATOL)

    second = trainer()
    second.restore(tmp_path / "ckpt", first.optimizer_state())
    np.testing.assert_array_equal(run(TFAdapter(), second.model, head)[0], ours)
    assert int(second.optimizer.iterations.numpy()) == int(first.optimizer.iterations.numpy()) == 2
