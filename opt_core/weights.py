"""THE parameter table of OPT, and the name and layout rules derived from it.

Canonical names are HF PyTorch keys of the model with a head (`model.decoder.layers.{i}.fc1.weight`, dense
weights in torch's `[out, in]` layout). One row per parameter says its kind, its shape in config fields and the
config condition under which it exists. Everything else derives from the rows:

* which parameters a given config and head has, with shapes (`parameter_specs`);
* the names each framework and file format uses, through one leaf rule per style (`LEAF_RULES`):
  torch / safetensors / .bin keep canonical names; Keras and HF's `tf_model.h5` use `kernel` (transposed),
  `gamma`/`beta`, and a quirk of HF's TF port: the token embedding's leaf is `weight`, the positions' `embeddings`;
  Flax and `flax_model.msgpack` use `kernel` (transposed), `embedding`, `scale`/`bias`;
* the inverse mapping, so a reader can take a file's names back to canonical ones, reporting every missing,
  unexpected or mis-shaped tensor at once (`match_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError

# Parameter kinds. A leaf rule maps each kind to a leaf name and a layout.
DENSE_WEIGHT = "dense_weight"  # torch [out, in]; Keras/Flax kernels are [in, out]
DENSE_BIAS = "dense_bias"
EMBEDDING = "embedding"
NORM_SCALE = "norm_scale"
NORM_BIAS = "norm_bias"

HEADS = ("base", "causal_lm", "sequence_classification", "question_answering")

# Tensor parallelism, stated once: per module, the dim of its canonical weight ([out, in], an embedding [V, E])
# that is split across devices. 0 is column parallel (the outputs: whole heads, FFN units, the vocabulary; the bias
# split with them), 1 is row parallel (the inputs; partial sums added across devices, the bias whole). Everything
# else is replicated. `opt_flax.sharding` and `opt_torch.distributed` derive their plans from it.
TENSOR_PARALLEL = {
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "fc1": 0,
    "out_proj": 1,
    "fc2": 1,
    "embed_tokens": 0,
    "lm_head": 0,
}
VOCABULARY_MODULES = ("embed_tokens", "lm_head")

# Conditions under which a row exists.
ALWAYS: Callable[[OPTConfig], bool] = lambda c: True  # noqa: E731
HAS_BIAS: Callable[[OPTConfig], bool] = lambda c: c.enable_bias  # noqa: E731
HAS_NORM_AFFINE: Callable[[OPTConfig], bool] = lambda c: c.layer_norm_elementwise_affine  # noqa: E731
HAS_PROJECTION: Callable[[OPTConfig], bool] = lambda c: c.has_projection  # noqa: E731
HAS_FINAL_NORM: Callable[[OPTConfig], bool] = (  # noqa: E731
    lambda c: c.has_final_layer_norm and c.layer_norm_elementwise_affine
)
UNTIED: Callable[[OPTConfig], bool] = lambda c: not c.tie_word_embeddings  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter: a name pattern ({i} is the layer index), its kind, shape in config fields, and condition."""

    pattern: str
    kind: str
    shape: tuple[str, ...]
    condition: Callable[[OPTConfig], bool] = ALWAYS
    head: str = "base"  # the head the parameter belongs to; "base" rows are in every model


# Shape symbols: V vocab, E word-embedding dim, D hidden, F ffn dim, P position rows, C num labels.
_SYMBOLS: dict[str, Callable[[OPTConfig], int]] = {
    "V": lambda c: c.vocab_size,
    "E": lambda c: c.word_embed_proj_dim,
    "D": lambda c: c.hidden_size,
    "F": lambda c: c.ffn_dim,
    "P": lambda c: c.num_position_rows,
    "C": lambda c: c.num_labels,
    "2": lambda c: 2,
}

_D = "model.decoder."
_L = "model.decoder.layers.{i}."
TABLE: tuple[Row, ...] = (
    Row(_D + "embed_tokens.weight", EMBEDDING, ("V", "E")),
    # OPT's position table has max_position_embeddings + 2 rows: positions are looked up at `+ 2`.
    Row(_D + "embed_positions.weight", EMBEDDING, ("P", "D")),
    Row(_D + "project_in.weight", DENSE_WEIGHT, ("D", "E"), HAS_PROJECTION),
    Row(_D + "project_out.weight", DENSE_WEIGHT, ("E", "D"), HAS_PROJECTION),
    Row(_D + "final_layer_norm.weight", NORM_SCALE, ("D",), HAS_FINAL_NORM),
    Row(_D + "final_layer_norm.bias", NORM_BIAS, ("D",), HAS_FINAL_NORM),
    *(
        row
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj")
        for row in (
            Row(_L + f"self_attn.{proj}.weight", DENSE_WEIGHT, ("D", "D")),
            Row(_L + f"self_attn.{proj}.bias", DENSE_BIAS, ("D",), HAS_BIAS),
        )
    ),
    Row(_L + "self_attn_layer_norm.weight", NORM_SCALE, ("D",), HAS_NORM_AFFINE),
    Row(_L + "self_attn_layer_norm.bias", NORM_BIAS, ("D",), HAS_NORM_AFFINE),
    Row(_L + "fc1.weight", DENSE_WEIGHT, ("F", "D")),
    Row(_L + "fc1.bias", DENSE_BIAS, ("F",), HAS_BIAS),
    Row(_L + "fc2.weight", DENSE_WEIGHT, ("D", "F")),
    Row(_L + "fc2.bias", DENSE_BIAS, ("D",), HAS_BIAS),
    Row(_L + "final_layer_norm.weight", NORM_SCALE, ("D",), HAS_NORM_AFFINE),
    Row(_L + "final_layer_norm.bias", NORM_BIAS, ("D",), HAS_NORM_AFFINE),
    # The LM head works in E space and is tied to embed_tokens unless the config unties it.
    Row("lm_head.weight", DENSE_WEIGHT, ("V", "E"), UNTIED, head="causal_lm"),
    Row("score.weight", DENSE_WEIGHT, ("C", "E"), head="sequence_classification"),
    # HF's QA head is a plain nn.Linear: it has a bias whatever `enable_bias` says.
    Row("qa_outputs.weight", DENSE_WEIGHT, ("2", "E"), head="question_answering"),
    Row("qa_outputs.bias", DENSE_BIAS, ("2",), head="question_answering"),
)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A parameter of one concrete model: canonical name, kind, shape, and the row it came from."""

    name: str
    kind: str
    shape: tuple[int, ...]
    head: str

    @property
    def is_head(self) -> bool:
        return self.head != "base"


def parameter_specs(config: OPTConfig, head: str = "causal_lm") -> list[ParamSpec]:
    """Every parameter of an OPT model with `head`, in table order (layer by layer)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    specs = []
    for row in _rows_in_order(config):
        if row.head not in ("base", head) or not row.condition(config):
            continue
        shape = tuple(_SYMBOLS[symbol](config) for symbol in row.shape)
        specs.append(ParamSpec(row.pattern, row.kind, shape, row.head))
    return specs


def _rows_in_order(config: OPTConfig):
    layer_rows = [row for row in TABLE if "{i}" in row.pattern]
    decoder_rows = [row for row in TABLE if "{i}" not in row.pattern and row.head == "base"]
    for row in decoder_rows:
        yield row
    for i in range(config.num_hidden_layers):
        for row in layer_rows:
            yield dataclasses.replace(row, pattern=row.pattern.format(i=i))
    yield from (row for row in TABLE if row.head != "base")


def kind_of(name: str) -> str:
    """The kind of a canonical name (layer index free), from the table."""
    pattern = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", name)
    for row in TABLE:
        if row.pattern == pattern:
            return row.kind
    raise KeyError(name)


# ----- leaf rules: canonical name <-> a framework's or file format's name


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """How one naming style spells a canonical parameter.

    Args:
        sep: separator between path components.
        layer_sep: how the `layers` component joins its index ("." gives `layers.3`, like HF's TF port).
        leaves: leaf name per kind; the token embedding may differ from the position embedding.
        token_embedding_leaf: leaf of `embed_tokens` (HF's TF port calls it `weight`, not `embeddings`).
        transpose_dense: whether dense weights are stored `[in, out]`.
        suffix: appended to every name (Keras' `:0`).
    """

    sep: str
    layer_sep: str
    leaves: Mapping[str, str]
    token_embedding_leaf: str
    transpose_dense: bool
    suffix: str = ""


LEAF_RULES: dict[str, LeafRule] = {
    "torch": LeafRule(
        sep=".",
        layer_sep=".",
        leaves={
            DENSE_WEIGHT: "weight",
            DENSE_BIAS: "bias",
            EMBEDDING: "weight",
            NORM_SCALE: "weight",
            NORM_BIAS: "bias",
        },
        token_embedding_leaf="weight",
        transpose_dense=False,
    ),
    "keras": LeafRule(
        sep="/",
        layer_sep=".",
        leaves={
            DENSE_WEIGHT: "kernel",
            DENSE_BIAS: "bias",
            EMBEDDING: "embeddings",
            NORM_SCALE: "gamma",
            NORM_BIAS: "beta",
        },
        token_embedding_leaf="weight",
        transpose_dense=True,
        suffix=":0",
    ),
    "flax": LeafRule(
        sep="/",
        layer_sep="/",
        leaves={
            DENSE_WEIGHT: "kernel",
            DENSE_BIAS: "bias",
            EMBEDDING: "embedding",
            NORM_SCALE: "scale",
            NORM_BIAS: "bias",
        },
        token_embedding_leaf="embedding",
        transpose_dense=True,
    ),
}


# Other spellings readers accept. HF's TF port stored the token embedding as `embed_tokens/weight:0`
# (TFSharedEmbeddings); a Keras `Embedding` layer in its place would write `embed_tokens/embeddings:0`.
LEAF_ALIASES: dict[str, dict[str, str]] = {
    "keras": {"model/decoder/embed_tokens/embeddings:0": "model/decoder/embed_tokens/weight:0"},
}


def style_name(name: str, kind: str, style: str) -> str:
    """The name `style` gives the canonical parameter `name` of `kind`."""
    rule = LEAF_RULES[style]
    *modules, _ = name.split(".")
    parts: list[str] = []
    for part in modules:
        if part.isdigit() and parts and parts[-1] == "layers":
            parts[-1] = f"layers{rule.layer_sep}{part}"
        else:
            parts.append(part)
    leaf = rule.token_embedding_leaf if modules[-1] == "embed_tokens" else rule.leaves[kind]
    return rule.sep.join(parts + [leaf]) + rule.suffix


def to_style_layout(array: np.ndarray, kind: str, style: str) -> np.ndarray:
    """A canonical (torch-layout) array in `style`'s layout: dense weights transposed for Keras and Flax."""
    if kind == DENSE_WEIGHT and LEAF_RULES[style].transpose_dense:
        return array.T
    return array


def module_path(name: str, head: str, sep: str = ".") -> str:
    """Where a canonical parameter lives in a model of `head`: a bare OPTModel has no `model.` level, as HF's."""
    return name.removeprefix("model" + sep) if head == "base" else name


def fresh_parameter(spec: ParamSpec, config: OPTConfig, rng: np.random.Generator) -> np.ndarray:
    """HF's init of one canonical parameter (float32, torch layout): normal(init_std) dense weights and
    embeddings, zero biases, unit norm scales, zero norm biases."""
    if spec.kind in (DENSE_WEIGHT, EMBEDDING):
        return rng.normal(0.0, config.init_std, spec.shape).astype(np.float32)
    return np.ones(spec.shape, np.float32) if spec.kind == NORM_SCALE else np.zeros(spec.shape, np.float32)


def style_names(config: OPTConfig, head: str, style: str) -> dict[str, ParamSpec]:
    """{style name: spec} for every parameter of the model."""
    return {style_name(spec.name, spec.kind, style): spec for spec in parameter_specs(config, head)}


# ----- matching a checkpoint's tensors against the table


@dataclasses.dataclass
class MatchResult:
    """Canonical tensors (torch layout) and the task-head parameters the checkpoint did not have."""

    tensors: dict[str, np.ndarray]
    missing_head_params: list[ParamSpec]


def _base_prefix_variants(style: str) -> tuple[str, str]:
    sep = LEAF_RULES[style].sep
    return "model" + sep, "decoder" + sep


def match_checkpoint(
    file_tensors: Mapping[str, Any],
    config: OPTConfig,
    head: str,
    style: str,
    source: str,
) -> MatchResult:
    """Maps a checkpoint's `{file name: array}` to canonical names, checking it against the table.

    Accepts base-model files (`decoder.*`) and head-model files (`model.decoder.*`), with or without
    `lm_head.weight` when the head is tied. A task head (`score`, `qa_outputs`) absent from the file is returned
    in `missing_head_params` so the caller can initialise it freshly, as HF does. Every other missing,
    unexpected or mis-shaped tensor is reported at once, by the name the file uses.

    Args:
        file_tensors: the file's names mapped to arrays (or lazy objects with `.shape`; they are not copied).
        style: the naming style of the file ("torch", "keras" or "flax").
        source: the file or folder, for error messages.
    """
    expected = style_names(config, head, style)
    model_prefix, decoder_prefix = _base_prefix_variants(style)
    tied_head_names = {style_name("lm_head.weight", DENSE_WEIGHT, style)}
    other_head_names = {style_name(row.pattern, row.kind, style) for row in TABLE if row.head not in ("base", head)}
    unused = []
    tensors: dict[str, Any] = {}
    unexpected, mis_shaped = [], []
    for file_name, array in file_tensors.items():
        name = model_prefix + file_name if file_name.startswith(decoder_prefix) else file_name
        name = LEAF_ALIASES.get(style, {}).get(name, name)
        spec = expected.get(name)
        if spec is None:
            if name in tied_head_names and config.tie_word_embeddings:
                continue  # a tied head saved anyway (older HF .bin files do this)
            if name in other_head_names:
                unused.append(file_name)  # another head's weights: loading a base model from a head model
                continue
            unexpected.append(file_name)
            continue
        want = _style_shape(spec, style)
        if tuple(array.shape) != want:
            mis_shaped.append(f"{file_name}: file has shape {tuple(array.shape)}, the config needs {want}")
            continue
        tensors[spec.name] = array
    found = set(tensors)
    missing = [n for n, s in expected.items() if s.name not in found and not s.is_head]
    missing_heads = [s for s in expected.values() if s.name not in found and s.is_head]
    if head == "causal_lm" and any(s.name == "lm_head.weight" for s in missing_heads):
        missing.append(style_name("lm_head.weight", DENSE_WEIGHT, style))  # an untied LM head is not optional
        missing_heads = [s for s in missing_heads if s.name != "lm_head.weight"]
    _raise_on_mismatch(source, missing, unexpected, mis_shaped)
    if unused:
        warnings.warn(f"{source}: weights not used by this model: {', '.join(unused)}", stacklevel=3)
    for spec in missing_heads:
        warnings.warn(
            f"{source} has no weights for the {spec.head} head parameter {spec.name!r}; it is newly "
            "initialised and needs training",
            stacklevel=3,
        )
    canonical = {name: to_style_layout(tensors[name], kind_of(name), style) for name in tensors}
    return MatchResult(canonical, missing_heads)


def _style_shape(spec: ParamSpec, style: str) -> tuple[int, ...]:
    if spec.kind == DENSE_WEIGHT and LEAF_RULES[style].transpose_dense:
        return tuple(reversed(spec.shape))
    return spec.shape


def _raise_on_mismatch(source: str, missing: list, unexpected: list, mis_shaped: list) -> None:
    if not (missing or unexpected or mis_shaped):
        return
    lines = [f"{source} does not match the model's configuration:"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mis_shaped),
    ):
        if items:
            shown = items if len(items) <= 20 else items[:20] + [f"... and {len(items) - 20} more"]
            lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
    raise CheckpointError("\n".join(lines))


def to_file_tensors(
    canonical: Mapping[str, np.ndarray], config: OPTConfig, head: str, style: str
) -> dict[str, np.ndarray]:
    """Canonical tensors to `style`'s names and layout, in table order, as HF names them for `head`.

    A base model (`head="base"`) is written with HF `OPTModel`'s `decoder.*` names in the torch and Flax styles;
    HF's TF port nests the decoder under `model/` for every model class.
    """
    out = {}
    for spec in parameter_specs(config, head):
        if spec.name not in canonical:
            raise CheckpointError(f"cannot save: parameter {spec.name!r} is missing from the model")
        name = style_name(spec.name, spec.kind, style)
        if style != "keras":
            name = module_path(name, head, LEAF_RULES[style].sep)
        out[name] = to_style_layout(canonical[spec.name], spec.kind, style)
    return out
