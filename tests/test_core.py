"""opt_core: config round trips, the parameter table, checkpoint formats and errors, hub, import isolation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opt_core import OPTConfig
from opt_core.checkpoint import load_checkpoint, save_checkpoint
from opt_core.errors import CheckpointError, ConfigError, InputError
from opt_core.files import parse_size
from opt_core.formats import FORMATS, detect_format, read_checkpoint
from opt_core.hub import resolve_model
from opt_core.inputs import validate_inputs
from opt_core.safetensors_file import read_safetensors, write_safetensors
from opt_core.weights import HEADS, LEAF_RULES, match_checkpoint, parameter_specs, style_name, to_file_tensors

# A config.json as the Hub's facebook/opt-350m has it (keys and values), including keys OPTConfig does not model.
OPT_350M_JSON = {
    "_name_or_path": "facebook/opt-350m",
    "_remove_final_layer_norm": False,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": False,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 4096,
    "hidden_size": 1024,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 2048,
    "model_type": "opt",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.20.0.dev0",
    "use_cache": True,
    "vocab_size": 50272,
    "word_embed_proj_dim": 512,
}


# ----- config


def test_config_json_round_trips_unchanged(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OPT_350M_JSON, indent=2))
    config = OPTConfig.from_pretrained(path)
    assert config.has_projection and not config.do_layer_norm_before and config.dtype == "float16"
    assert config.extra["prefix"] == "</s>"
    config.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == OPT_350M_JSON
    assert list(json.loads((tmp_path / "out" / "config.json").read_text())) == list(OPT_350M_JSON)


def test_config_keeps_dtype_key_name_and_adds_changed_keys(tmp_path):
    data = {**OPT_350M_JSON, "dtype": "bfloat16"}
    del data["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = OPTConfig.from_pretrained(tmp_path / "config.json")
    config.enable_bias = False
    out = config.to_dict()
    assert out["dtype"] == "bfloat16" and "torch_dtype" not in out and out["enable_bias"] is False


def test_config_loads_in_hf_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = OPTConfig.from_preset("opt-350m", num_labels=3)
    ours.save_pretrained(tmp_path)
    theirs = transformers.OPTConfig.from_pretrained(tmp_path)
    for key in ("hidden_size", "ffn_dim", "word_embed_proj_dim", "do_layer_norm_before", "num_labels"):
        assert getattr(theirs, key) == getattr(ours, key), key
    theirs.save_pretrained(tmp_path / "hf")
    back = OPTConfig.from_pretrained(tmp_path / "hf")
    assert back.id2label == ours.id2label and back.word_embed_proj_dim == 512


def test_config_overrides_as_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OPT_350M_JSON))
    config = OPTConfig.from_pretrained(tmp_path / "config.json", num_labels=3, dropout=0.0, custom_flag=True)
    assert config.num_labels == 3 and config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert config.dropout == 0.0 and config.extra["custom_flag"] is True
    assert config.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(hidden_size=100, num_attention_heads=12), "divisible by num_attention_heads"),
        (dict(activation_function="mish"), "activation_function 'mish' is not supported"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(pad_token_id=60000), "pad_token_id must be an id"),
        (dict(dropout=1.5), "dropout must be a probability"),
        (dict(enable_bias="yes"), "enable_bias must be true or false"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ConfigError, match=message):
        OPTConfig(**bad)


def test_config_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        OPTConfig.from_pretrained(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="not an OPT model"):
        OPTConfig.from_pretrained(tmp_path / "config.json")


@pytest.mark.parametrize("name", ["opt-125m", "facebook/opt-350m", "opt-1.3b", "opt-66b", "opt-175b"])
def test_presets_have_published_parameter_counts(name):
    counts = {"opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1.316e9, "opt-66b": 65.7e9, "opt-175b": 175e9}
    config = OPTConfig.from_preset(name)
    total = sum(int(np.prod(s.shape)) for s in parameter_specs(config, "causal_lm"))
    assert abs(total / counts[name.split("/")[-1]] - 1) < 0.01


# ----- the parameter table

configs = st.builds(
    lambda layers, heads, head_dim, proj, pre_ln, bias, affine, tied, remove_final, labels: OPTConfig(
        vocab_size=50,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        ffn_dim=3 * heads,
        max_position_embeddings=16,
        word_embed_proj_dim=(heads * head_dim) // 2 if proj else None,
        do_layer_norm_before=pre_ln,
        enable_bias=bias,
        layer_norm_elementwise_affine=affine,
        tie_word_embeddings=tied,
        _remove_final_layer_norm=remove_final,
        num_labels=labels,
    ),
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([2, 4]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(1, 4),
)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(config=configs, head=st.sampled_from(HEADS), style=st.sampled_from(sorted(LEAF_RULES)))
def test_table_is_a_bijection_for_every_config(config, head, style):
    specs = parameter_specs(config, head)
    canonical = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    assert len(canonical) == len(specs)
    file_tensors = to_file_tensors(canonical, config, head, style)
    assert len(set(file_tensors)) == len(specs)  # distinct names in every style
    back = match_checkpoint(file_tensors, config, head, style, source="test")
    assert set(back.tensors) == set(canonical) and not back.missing_head_params
    for name, array in back.tensors.items():
        assert array.shape == canonical[name].shape


def test_table_rules_follow_hf_names():
    config = OPTConfig.from_preset("opt-350m", num_hidden_layers=1)
    names = {s.name for s in parameter_specs(config, "causal_lm")}
    assert "model.decoder.project_in.weight" in names and "model.decoder.final_layer_norm.weight" not in names
    assert "lm_head.weight" not in names  # tied
    untied = {s.name for s in parameter_specs(config.replace(tie_word_embeddings=False), "causal_lm")}
    assert "lm_head.weight" in untied
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert style_name(q, "dense_weight", "keras") == "model/decoder/layers.0/self_attn/q_proj/kernel:0"
    assert style_name(q, "dense_weight", "flax") == "model/decoder/layers/0/self_attn/q_proj/kernel"
    tokens, positions = "model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"
    assert style_name(tokens, "embedding", "keras") == "model/decoder/embed_tokens/weight:0"
    assert style_name(positions, "embedding", "keras") == "model/decoder/embed_positions/embeddings:0"
    assert style_name(tokens, "embedding", "flax") == "model/decoder/embed_tokens/embedding"
    ln = "model.decoder.layers.0.final_layer_norm.weight"
    assert style_name(ln, "norm_scale", "keras").endswith("final_layer_norm/gamma:0")
    assert style_name(ln, "norm_scale", "flax").endswith("final_layer_norm/scale")


def test_match_reports_every_problem_at_once():
    config = OPTConfig(**_TINY)
    specs = {s.name: np.zeros(s.shape, np.float32) for s in parameter_specs(config, "causal_lm")}
    del specs["model.decoder.layers.1.fc2.bias"]
    specs["model.decoder.layers.0.fc1.weight"] = np.zeros((3, 3), np.float32)
    specs["model.decoder.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError) as error:
        match_checkpoint(specs, config, "causal_lm", "torch", source="ckpt.safetensors")
    text = str(error.value)
    assert "ckpt.safetensors" in text and "model.decoder.layers.1.fc2.bias" in text
    assert "model.decoder.extra.weight" in text and "fc1.weight: file has shape (3, 3)" in text


_TINY = dict(
    vocab_size=40, hidden_size=8, num_hidden_layers=2, ffn_dim=12, num_attention_heads=2, max_position_embeddings=16
)


# ----- checkpoint formats


def random_canonical(config, head="causal_lm", dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(dtype) for s in parameter_specs(config, head)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shard_size", ["1GB", "2KB"], ids=["single", "sharded"])
def test_every_format_round_trips_bit_exact(tmp_path, fmt, dtype, shard_size):
    config = OPTConfig(**_TINY, tie_word_embeddings=False, word_embed_proj_dim=4)
    canonical = random_canonical(config, dtype=dtype)
    save_checkpoint(canonical, tmp_path, config, "causal_lm", fmt=fmt, max_shard_size=shard_size)
    assert detect_format(tmp_path)[0] == fmt
    back = load_checkpoint(tmp_path, config, "causal_lm").tensors
    assert set(back) == set(canonical)
    # HDF5 has no bfloat16: the tf format stores it as float32, value for value.
    stored = np.float32 if (fmt == "tf" and dtype == ml_dtypes.bfloat16) else dtype
    for name, array in canonical.items():
        assert back[name].dtype == stored and np.array_equal(back[name], array.astype(stored)), name


def test_base_model_files_use_hf_opt_model_names(tmp_path):
    config = OPTConfig(**_TINY)
    save_checkpoint(random_canonical(config, "base"), tmp_path, config, "base", fmt="safetensors")
    names = set(read_safetensors(tmp_path / "model.safetensors"))
    assert "decoder.embed_tokens.weight" in names and not any(n.startswith("model.") for n in names)


def test_folder_with_several_formats_prefers_safetensors(tmp_path):
    # A hub repository holds every format side by side (a save here leaves one: see test_saving.py).
    config = OPTConfig(**_TINY)
    for fmt in ("tf", "flax", "pytorch", "safetensors"):
        for file in save_checkpoint(random_canonical(config), tmp_path / fmt, config, "causal_lm", fmt=fmt):
            file.rename(tmp_path / file.name)
    assert detect_format(tmp_path)[0] == "safetensors"
    (tmp_path / "model.safetensors").unlink()
    assert detect_format(tmp_path)[0] == "pytorch"
    assert detect_format(tmp_path, "tf")[0] == "tf"


def test_safetensors_writer_matches_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("cut", [4, 20, -10])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
    write_safetensors({"a": np.ones((4, 4), np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint(tmp_path)


def test_empty_folder_and_bad_index_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        detect_format(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="not a shard index"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("sharded", [False, True])
def test_a_git_lfs_pointer_is_named_in_every_format(tmp_path, fmt, sharded):
    config = OPTConfig(**_TINY)
    files = save_checkpoint(
        random_canonical(config), tmp_path, config, "causal_lm", fmt=fmt, max_shard_size=2000 if sharded else "5GB"
    )
    assert (len(files) > 2) == sharded
    files[0].write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
    with pytest.raises(CheckpointError, match=f"{files[0].name}: is a git-lfs pointer"):
        read_checkpoint(tmp_path)


def _safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


F32x2 = {"dtype": "F32", "shape": [2]}


def _two_tensors(a: list[int], b: list[int], data_bytes: int) -> bytes:
    return _safetensors_bytes({"a": {**F32x2, "data_offsets": a}, "b": {**F32x2, "data_offsets": b}}, bytes(data_bytes))


HOSTILE_SAFETENSORS = {
    "header_past_the_file": (b"\xff" * 8, "its header claims"),
    "header_over_100MB": ((200_000_000).to_bytes(8, "little") + b"{" * 16, "over the 100 MB limit"),
    "deeply_nested_json": (_safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "header is not JSON"),
    "one_terabyte_tensor": (
        _safetensors_bytes({"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 8]}}, bytes(8)),
        "has 8 bytes for shape",
    ),
    "shape_that_wraps_int64": (
        _safetensors_bytes({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}),
        "has 0 bytes for shape",
    ),
    "negative_dimension": (
        _safetensors_bytes({"w": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, bytes(8)),
        "malformed header entry",
    ),
    "offsets_past_the_file": (
        _safetensors_bytes({"w": {**F32x2, "data_offsets": [0, 8]}}, bytes(4)),
        "is truncated: tensor 'w' ends",
    ),
    "offsets_reversed": (
        _safetensors_bytes({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
        "end before they begin",
    ),
    "overlapping_tensors": (
        _safetensors_bytes(
            {"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)
        ),
        "overlaps the tensor before it",
    ),
    "aliased_tensors": (
        _two_tensors([0, 8], [0, 8], 8),
        "overlaps the tensor before it",
    ),
    "gap_between_tensors": (
        _safetensors_bytes(
            {"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, bytes(20)
        ),
        "leaves a gap",
    ),
    "unknown_dtype": (
        _safetensors_bytes({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
        "malformed header entry",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_are_refused_by_name(tmp_path, case):
    content, message = HOSTILE_SAFETENSORS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        read_safetensors(path)
    assert "model.safetensors" in str(error.value)


BAD_CONFIGS = {
    "nested_too_deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "id2label_a_list": ({"id2label": ["a", "b"]}, "id2label must map"),
    "id2label_bad_key": ({"id2label": {"x": "a"}}, "id2label keys must be class ids"),
    "a_trillion_labels": ({"num_labels": 10**12}, "num_labels must be an integer in"),
}
BAD_GENERATION_CONFIGS = {
    "nested_too_deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "a_list": ("[]", "must hold a JSON object"),
    "num_beams_a_string": ({"num_beams": "2"}, "num_beams must be an integer, got '2'"),
    "do_sample_a_number": ({"do_sample": 1}, "do_sample must be true or false"),
    "eos_id_a_string": ({"eos_token_id": [2, "x"]}, "eos_token_id must be one int or a list"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_malformed_config_json_is_refused_by_name(tmp_path, case):
    content, message = BAD_CONFIGS[case]
    if isinstance(content, dict):
        content = json.dumps({**OPTConfig(**_TINY).to_dict(), **content})
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        OPTConfig.from_pretrained(tmp_path)
    assert "config.json" in str(error.value)


@pytest.mark.parametrize("case", list(BAD_GENERATION_CONFIGS))
def test_a_malformed_generation_config_json_is_refused_by_name(tmp_path, case):
    from opt_core.generation import GenerationConfig

    content, message = BAD_GENERATION_CONFIGS[case]
    (tmp_path / "generation_config.json").write_text(json.dumps(content) if isinstance(content, dict) else content)
    with pytest.raises(ConfigError, match=message) as error:
        GenerationConfig.from_pretrained(tmp_path)
    assert "generation_config.json" in str(error.value)


def test_parse_size_follows_hf():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("5GiB") == 5 * 2**30
    assert parse_size("200MB") == 200 * 10**6 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("big")


# ----- inputs


def test_validate_inputs_errors():
    config = OPTConfig(**_TINY)
    ids = np.array([[3, 4, 5]])
    validate_inputs(config, ids, np.ones((1, 3), np.int64), None, 0, (1, 3))
    with pytest.raises(InputError, match=r"token id 40 at position \(0, 1\)"):
        validate_inputs(config, np.array([[3, 40]]), None, None, 0, (1, 2))
    with pytest.raises(InputError, match="token id -1"):
        validate_inputs(config, np.array([[-1]]), None, None, 0, (1, 1))
    with pytest.raises(InputError, match="max_position_embeddings=16"):
        validate_inputs(config, np.full((1, 17), 3), None, None, 0, (1, 17))
    with pytest.raises(InputError, match=r"need shape \(1, 5\)"):
        validate_inputs(config, ids, np.ones((1, 3)), None, 2, (1, 3))
    with pytest.raises(InputError, match="only 0"):
        validate_inputs(config, ids, np.full((1, 3), 2), None, 0, (1, 3))
    # Left padding does not use up positions: 20 slots, 16 real tokens, fits.
    mask = np.concatenate([np.zeros((1, 4)), np.ones((1, 16))], 1).astype(np.int64)
    validate_inputs(config, np.full((1, 20), 3), mask, None, 0, (1, 20))


# ----- hub


def test_hub_offline_error_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"config.json of 'facebook/opt-125m' is not in the local cache"):
        resolve_model("facebook/opt-125m", cache_dir=tmp_path)


def test_hub_uses_the_cache_offline(tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub lays it out resolves offline, fetching only one format."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "models--facebook--opt-tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--facebook--opt-tiny" / "refs").mkdir()
    (tmp_path / "models--facebook--opt-tiny" / "refs" / "main").write_text("a" * 40)
    config = OPTConfig(**_TINY)
    config.save_pretrained(snapshot)
    save_checkpoint(random_canonical(config), snapshot, config, "causal_lm", fmt="flax")
    folder = resolve_model("facebook/opt-tiny", cache_dir=tmp_path)
    assert folder == snapshot and detect_format(folder)[0] == "flax"


def test_not_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="not an existing folder"):
        resolve_model(str(tmp_path / "missing" / "deeper"))


# ----- isolation


def test_opt_core_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "tensorflow", "keras", "jax", "jaxlib", "flax", "tf_keras"}:
                    raise ImportError("blocked framework: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, opt_core, opt_core.checkpoint, opt_core.hub, opt_core.weights, opt_core.inputs
        import opt_core.torch_pickle, opt_core.keras_h5, opt_core.flax_msgpack, opt_core.outputs, opt_core.pretrained
        from opt_core.checkpoint import save_checkpoint, load_checkpoint
        config = opt_core.OPTConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, ffn_dim=8,
                                    num_attention_heads=2, max_position_embeddings=8)
        from opt_core.weights import parameter_specs
        tensors = {s.name: np.zeros(s.shape, np.float32) for s in parameter_specs(config, "causal_lm")}
        import tempfile
        for fmt in ("safetensors", "pytorch", "tf", "flax"):
            folder = tempfile.mkdtemp()
            save_checkpoint(tensors, folder, config, "causal_lm", fmt=fmt)
            load_checkpoint(folder, config, "causal_lm")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_keras_token_embedding_alias_is_accepted():
    config = OPTConfig(**_TINY)
    tensors = to_file_tensors(random_canonical(config), config, "causal_lm", "keras")
    tensors["model/decoder/embed_tokens/embeddings:0"] = tensors.pop("model/decoder/embed_tokens/weight:0")
    back = match_checkpoint(tensors, config, "causal_lm", "keras", source="tf_model.h5")
    assert "model.decoder.embed_tokens.weight" in back.tensors


def test_compile_cache_folders(monkeypatch, tmp_path):
    """JAX's cache folder by default; TensorFlow's XLA cache only when OPT_LM_COMPILE_CACHE names a folder (its
    warm starts log an ERROR line, opt_core.compile_cache); "0" turns both off; a user's own TF flag wins."""
    from opt_core.compile_cache import cache_folder, tf_xla_flags

    monkeypatch.delenv("OPT_LM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_folder("jax") == tmp_path / "opt-lm" / "compiled" / "jax"
    assert tf_xla_flags("--tf_xla_auto_jit=2") == "--tf_xla_auto_jit=2"
    monkeypatch.setenv("OPT_LM_COMPILE_CACHE", str(tmp_path / "c"))
    assert tf_xla_flags("") == f"--tf_xla_persistent_cache_directory={tmp_path / 'c' / 'tf'}"
    assert tf_xla_flags("--tf_xla_persistent_cache_directory=/mine") == "--tf_xla_persistent_cache_directory=/mine"
    monkeypatch.setenv("OPT_LM_COMPILE_CACHE", "0")
    assert cache_folder("jax") is None and tf_xla_flags("") == ""
