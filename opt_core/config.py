"""`OPTConfig`: the one configuration shared by the PyTorch, TensorFlow and Flax implementations.

Field names are HF `config.json` keys, so a file HF wrote reads here and a file written here reads in HF. A loaded
file round-trips unchanged: keys this class does not model are kept in `extra`, keys are written back in the
file's order, and a key the file lacked is only added when its value was changed after loading.

The framework packages never read `config.json` themselves; they take an `OPTConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from opt_core.errors import ConfigError
from opt_core.files import atomic_write_text, complete_interrupted_save
from opt_core.hub import resolve_file

CONFIG_NAME = "config.json"

# Activations every framework implements (HF's ACT2FN names).
SUPPORTED_ACTIVATIONS = (
    "relu",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "silu",
    "swish",
    "tanh",
)

# Shapes of the released checkpoints (facebook/opt-*); opt-175b was released on request only.
PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864),
    "opt-175b": dict(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96, ffn_dim=49152),
}

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "ffn_dim",
    "max_position_embeddings",
    "num_attention_heads",
    "word_embed_proj_dim",
)
_BOOL_FIELDS = (
    "do_layer_norm_before",
    "_remove_final_layer_norm",
    "enable_bias",
    "layer_norm_elementwise_affine",
    "tie_word_embeddings",
    "use_cache",
)
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclasses.dataclass
class OPTConfig:
    """Hyper-parameters of an OPT model, with HF `OPTConfig`'s field names and defaults (opt-125m's shape).

    Args:
        vocab_size: rows of the token embedding (50272 for every released OPT; the tokenizer has 50265).
        hidden_size: D, the width of the residual stream.
        num_hidden_layers: L, the number of decoder layers.
        ffn_dim: F, the width of each layer's feed-forward block.
        max_position_embeddings: the longest sequence; the position table has 2 more rows (OPT's offset).
        do_layer_norm_before: pre-LN when True; opt-350m is post-LN (False).
        _remove_final_layer_norm: drop the decoder's final LayerNorm (checkpoints fine-tuned before HF v4.20.1).
        word_embed_proj_dim: E, the token-embedding width; when it differs from D (opt-350m), `project_in` and
            `project_out` map between E and D. None means D.
        dropout, attention_dropout, layerdrop: training-time regularisation; inference ignores them.
        num_attention_heads: N; head_dim = D / N.
        activation_function: the feed-forward activation, one of SUPPORTED_ACTIVATIONS.
        init_std: standard deviation of freshly initialised weights.
        enable_bias: whether attention and feed-forward projections carry biases.
        layer_norm_elementwise_affine: whether LayerNorms carry a scale and bias.
        tie_word_embeddings: whether the LM head reuses `embed_tokens` (True for every released OPT).
        pad_token_id, bos_token_id, eos_token_id: special token ids (1, 2, 2 for OPT's tokenizer).
        id2label: labels of the sequence-classification head; None means HF's default two labels.
        problem_type: the sequence-classification loss; None picks it from num_labels and the labels' dtype.
        dtype: the dtype the checkpoint was stored in (`torch_dtype` or `dtype` in config.json), e.g. "float16".
        extra: every other key of config.json, kept for the round trip.
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    id2label: dict[int, str] | None = None
    num_labels: int | None = None
    problem_type: str | None = None
    dtype: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.id2label is not None:
            self.id2label = _labels(self.id2label)
        # As HF: id2label is the source of truth; num_labels=N alone means labels LABEL_0 .. LABEL_{N-1}.
        if self.num_labels is not None and (self.id2label is None or len(self.id2label) != self.num_labels):
            labels = self.num_labels
            if isinstance(labels, bool) or not isinstance(labels, int) or not 1 <= labels <= MAX_LABELS:
                raise ConfigError(f"num_labels must be an integer in [1, {MAX_LABELS}], got {labels!r}")
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)} if self.num_labels != 2 else None
        self.num_labels = len(self.id2label) if self.id2label else 2
        # Bookkeeping for an unchanged round trip: the file's key order, what the dtype key was called, and the
        # values as loaded (a key the file lacked is written only if its value changed since).
        self._file_keys: list[str] | None = None
        self._dtype_key = "torch_dtype"
        self._loaded_values: dict[str, Any] = {}
        self.validate()

    # ----- derived quantities (used by the parameter table and the models)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.resolved_id2label.items()}

    @property
    def resolved_id2label(self) -> dict[int, str]:
        return self.id2label or {0: "LABEL_0", 1: "LABEL_1"}

    @property
    def has_projection(self) -> bool:
        """opt-350m embeds tokens in E != D dimensions and projects in and out of the residual stream."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        """Post-LN models and checkpoints fine-tuned before HF v4.20.1 have no final LayerNorm."""
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @property
    def num_position_rows(self) -> int:
        """OPT's position table has 2 extra rows: positions are looked up at `position + 2` (a metaseq relic)."""
        return self.max_position_embeddings + 2

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ----- validation

    def validate(self) -> None:
        """Raises ConfigError naming the first field that is wrong."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"OPTConfig.{name} must be a positive integer, got {value!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"OPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"choose one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        for name in ("dropout", "attention_dropout", "layerdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"OPTConfig.{name} must be a probability in [0, 1], got {value!r}")
        for name in ("pad_token_id", "bos_token_id"):
            self._check_token_id(name, getattr(self, name))
        for token_id in self.eos_token_ids:
            self._check_token_id("eos_token_id", token_id)
        if self.problem_type not in _PROBLEM_TYPES:
            raise ConfigError(f"problem_type must be one of {_PROBLEM_TYPES}, got {self.problem_type!r}")

    def _check_token_id(self, name: str, token_id: Any) -> None:
        if token_id is None:
            return
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
            raise ConfigError(f"{name} must be an id in [0, {self.vocab_size}), got {token_id!r}")

    # ----- dict and JSON

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> OPTConfig:
        """Builds a config from config.json's keys; `overrides` win (HF's keyword overrides, `num_labels` too)."""
        data = {**data, **overrides}
        data.pop("label2id", None)  # derived from id2label
        model_type = data.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"config.json describes a {model_type!r} model, not an OPT model")
        dtype_key = "dtype" if "dtype" in data else "torch_dtype"
        dtype = data.pop("dtype", None) or data.pop("torch_dtype", None)
        data.pop("torch_dtype", None)
        field_names = {f.name for f in dataclasses.fields(cls)} - {"extra", "dtype"}
        known = {k: v for k, v in data.items() if k in field_names}
        extra = {k: v for k, v in data.items() if k not in field_names}
        try:
            config = cls(**known, dtype=dtype, extra=extra)
        except TypeError as error:
            raise ConfigError(f"invalid OPT configuration: {error}") from None
        config._dtype_key = dtype_key
        return config

    def to_dict(self) -> dict[str, Any]:
        """config.json's keys: the file's keys in its order (if loaded from one), then any changed or new ones."""
        values = self._field_values()
        if self._file_keys is None:
            out = {"model_type": "opt", "architectures": ["OPTForCausalLM"]}
            out.update(values)
            out.update(self.extra)
            return out
        out: dict[str, Any] = {}
        for key in self._file_keys:
            if key in values:
                out[key] = values[key]
            elif key in self.extra:
                out[key] = self.extra[key]
        for key, value in values.items():
            if key not in out and self._loaded_values.get(key, _MISSING) != value:
                out[key] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def _field_values(self) -> dict[str, Any]:
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("extra", "dtype", "id2label", "num_labels")
        }
        if self.id2label is not None:
            # JSON object keys are strings; HF writes id2label and label2id together.
            values["id2label"] = {str(i): label for i, label in self.id2label.items()}
            values["label2id"] = self.label2id
        if self.dtype is not None:
            values[self._dtype_key] = self.dtype
        return values

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=self._file_keys is None) + "\n"

    # ----- files

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> OPTConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deep
            raise ConfigError(f"{path} is not valid JSON: {type(error).__name__} {error}"[:300]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            config = cls.from_dict(data, **overrides)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        config._file_keys = list(data)
        config._loaded_values = config._field_values()
        return config

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision: str | None = None, **overrides: Any
    ) -> OPTConfig:
        """Reads config.json from a folder, a file, or a hub id (through huggingface_hub).

        Args:
            name_or_path: a local folder or config.json file, or a hub id such as "facebook/opt-125m".
            revision: the hub revision (branch, tag or commit) when name_or_path is a hub id.
            **overrides: fields to set after reading, as in HF (e.g. `num_labels=3`, `dropout=0.0`).
        """
        path = Path(name_or_path)
        if path.exists():
            complete_interrupted_save(path)  # a save killed after its commit point is finished first
        if path.is_file():
            return cls.from_json_file(path, **overrides)
        return cls.from_json_file(resolve_file(name_or_path, CONFIG_NAME, revision=revision), **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OPTConfig:
        """The shape of a released checkpoint: "opt-125m" (or "facebook/opt-125m") ... "opt-66b", "opt-175b"."""
        key = name.split("/")[-1].lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown OPT preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        atomic_write_text(path, self.to_json_string())
        return path

    def replace(self, **changes: Any) -> OPTConfig:
        """A copy with some fields changed (the round-trip bookkeeping is kept)."""
        changes.setdefault("extra", copy.deepcopy(self.extra))
        if "id2label" in changes and "num_labels" not in changes:
            changes["num_labels"] = None  # derive it from the new labels
        new = dataclasses.replace(self, **changes)
        new._file_keys, new._dtype_key = self._file_keys, self._dtype_key
        new._loaded_values = dict(self._loaded_values)
        return new


_MISSING = object()
MAX_LABELS = 1_000_000  # far more classes than any classifier has; the bound keeps a hostile config from hanging


def _labels(id2label: Any) -> dict[int, str]:
    """config.json's id2label ({"0": "NEGATIVE", ...}) with int keys; a ConfigError naming what is wrong."""
    if not isinstance(id2label, dict) or len(id2label) > MAX_LABELS:
        raise ConfigError(f"id2label must map at most {MAX_LABELS} class ids to names, got {str(id2label)[:100]}")
    try:
        return {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"id2label keys must be class ids (integers), got {list(id2label)[:10]}") from None
