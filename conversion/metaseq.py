"""Meta's original metaseq OPT checkpoints as canonical (HF-named) lazy tensors and an `OPTConfig`.

Two layouts (facts from facebookresearch/metaseq: `distributed/stitch_fsdp_ckpt.py` `reshard_megatron_parts`,
`scripts/convert_to_singleton.py`, `models/transformer_decoder.py`; HF's
`convert_opt_original_pytorch_checkpoint_to_pytorch.py`):

* a singleton (`restored.pt`, `model.pt`): `torch.save({"model": state dict, "cfg": ..., "args": ..., ...})`;
* model-parallel parts (`reshard-model_part-0.pt` ... `-N.pt`), each the same dict holding its Megatron slice of
  every parameter: column-parallel `qkv_proj`, `k/q/v_proj` and `fc1` (weights and biases) split along the output
  rows, row-parallel `out_proj` and `fc2` weights along the input columns (their biases are replicated), the
  vocabulary-parallel `embed_tokens` along the rows; norms, positions and `project_in/out_dim` are replicated.

Names are `decoder.*` and differ from HF's in a few places: a fused `self_attn.qkv_proj` whose rows are k, v, q
(in that order, within each model-parallel part), `decoder.layer_norm` (HF's `final_layer_norm`),
`project_in_dim`/`project_out_dim` (HF's `project_in`/`project_out`), and `decoder.version` and
`decoder.output_projection.weight` (a copy of the tied `embed_tokens`), which HF drops.

Files are read with `opt_core.torch_pickle.load_objects`: tensors are memory-mapped, and the non-tensor objects
metaseq stores beside `"model"` (`cfg`, `args`, optimizer history) become inert placeholders that are read as data,
never constructed or called. FSDP-flattened files (`flat_param_*`) are not handled: metaseq's own tools unflatten them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError, ConfigError
from opt_core.lazy import LazyTensor, same_bits
from opt_core.torch_pickle import PickledObject, load_objects

PART_PATTERN = re.compile(r"^(?P<prefix>.+)-model_part-(?P<index>\d+)\.pt$")
SINGLETON_NAMES = ("restored.pt", "model.pt", "consolidated.pt")
# Names only metaseq uses, to tell a metaseq state dict from an HF one saved as `.pt`.
_METASEQ_MARKERS = re.compile(r"^decoder\.(version$|layer_norm\.|project_(in|out)_dim\.|output_projection\.)|qkv_proj")

# metaseq names (outside the layers) that HF spells differently; the layers' names are HF's already.
_RENAMES = {
    "decoder.project_in_dim.weight": "model.decoder.project_in.weight",
    "decoder.project_out_dim.weight": "model.decoder.project_out.weight",
    "decoder.layer_norm.weight": "model.decoder.final_layer_norm.weight",
    "decoder.layer_norm.bias": "model.decoder.final_layer_norm.bias",
}
_VERSION = "decoder.version"
_OUTPUT_PROJECTION = "decoder.output_projection.weight"
_EMBED_TOKENS = "decoder.embed_tokens.weight"
# metaseq's fused projection holds k, then v, then q rows (within each model-parallel part).
_QKV_ORDER = ("k_proj", "v_proj", "q_proj")
# Megatron's partitioning: column- and vocabulary-parallel modules split their output rows (dim 0), row-parallel
# ones their weights' input columns (dim 1) and add a replicated bias after the all-reduce.
_COLUMN_PARALLEL = {"qkv_proj", "q_proj", "k_proj", "v_proj", "fc1", "embed_tokens", "output_projection"}
_ROW_PARALLEL = {"out_proj", "fc2"}

# metaseq model options (cfg["model"] or the older args Namespace) -> OPTConfig fields, with the accepted type.
_CFG_FIELDS = {
    "decoder_embed_dim": ("hidden_size", int),
    "decoder_input_dim": ("word_embed_proj_dim", int),
    "decoder_layers": ("num_hidden_layers", int),
    "decoder_attention_heads": ("num_attention_heads", int),
    "decoder_ffn_embed_dim": ("ffn_dim", int),
    "max_target_positions": ("max_position_embeddings", int),
    "decoder_normalize_before": ("do_layer_norm_before", bool),
    "activation_fn": ("activation_function", str),
    "dropout": ("dropout", float),
    "attention_dropout": ("attention_dropout", float),
}


# ----- finding and reading files


def find_files(path: Path) -> list[Path] | None:
    """The metaseq checkpoint files at `path`: all model parts, or one singleton; None when it holds none.

    Args:
        path: a folder, a singleton `.pt`, or any one `*-model_part-N.pt` (its siblings are found).
    """
    if path.is_file():
        match = PART_PATTERN.match(path.name)
        return _model_parts(path.parent, match["prefix"]) if match else [path]
    if not path.is_dir():
        return None
    prefixes = sorted({m["prefix"] for p in path.glob("*-model_part-*.pt") if (m := PART_PATTERN.match(p.name))})
    if len(prefixes) > 1:
        raise CheckpointError(f"{path} holds model parts of several checkpoints ({', '.join(prefixes)}); pass one file")
    if prefixes:
        return _model_parts(path, prefixes[0])
    singletons = [path / name for name in SINGLETON_NAMES if (path / name).is_file()]
    return singletons[:1] or None


def _model_parts(folder: Path, prefix: str) -> list[Path]:
    parts = {}
    for file in folder.iterdir():
        match = PART_PATTERN.match(file.name)
        if match and match["prefix"] == prefix:
            parts[int(match["index"])] = file
    missing = [str(i) for i in range(max(parts) + 1) if i not in parts]
    if missing:
        raise CheckpointError(f"{folder}: model parts {', '.join(missing)} of {prefix}-model_part-N.pt are missing")
    return [parts[i] for i in range(len(parts))]


def looks_like_metaseq(path: Path) -> bool:
    """Whether a `.pt` file or a folder without HF weights holds a metaseq checkpoint (by its names and layout)."""
    if path.is_dir():
        return find_files(path) is not None
    if path.suffix != ".pt":
        return False
    if PART_PATTERN.match(path.name) or path.name in SINGLETON_NAMES:
        return True
    obj = load_objects(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return True
    return isinstance(obj, dict) and any(isinstance(k, str) and _METASEQ_MARKERS.search(k) for k in obj)


def read_part(file: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, model options) of one metaseq file; the options are {} when the file carries none."""
    obj = load_objects(file)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a metaseq checkpoint (a dict with 'model')")
    state = obj.get("model", obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: 'model' is a {type(state).__name__}, not a state dict")
    flat = [k for k in state if isinstance(k, str) and "flat_param" in k]
    if flat:
        raise CheckpointError(
            f"{file}: holds FSDP-flattened parameters ({flat[0]}, ...); unflatten it first with metaseq's "
            "scripts (convert_to_singleton, or consolidate_fsdp_shards) and convert the result"
        )
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{file}: state dict entries that are not tensors: {', '.join(bad[:10])}")
    return state, model_options(obj)


def model_options(obj: dict) -> dict[str, Any]:
    """metaseq's model options from `cfg["model"]` (newer files) or `args` (older ones), read as plain data."""
    options = _mapping(_mapping(obj.get("cfg")).get("model"))
    return options or _mapping(obj.get("args"))


def _mapping(value: Any) -> dict[str, Any]:
    """A dict, argparse.Namespace or omegaconf DictConfig, as `load_objects` returns them, as a plain dict."""
    if isinstance(value, PickledObject):
        state = value.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]  # (__dict__, __slots__ values)
        # A DictConfig keeps its entries under `_content`; a dict subclass records them as items.
        value = state.get("_content", state) if isinstance(state, dict) else dict(value.items)
    if not isinstance(value, dict):
        return {}
    return {k: _plain(v) for k, v in value.items() if isinstance(k, str)}


def _plain(value: Any) -> Any:
    # omegaconf wraps each value in a node whose pickled state keeps it under `_val`.
    if isinstance(value, PickledObject) and isinstance(value.state, dict) and "_val" in value.state:
        return value.state["_val"]
    return value


# ----- state dicts -> canonical lazy tensors


def canonical_tensors(parts: list[dict[str, np.ndarray]], files: list[Path]) -> dict[str, LazyTensor]:
    """HF-named lazy tensors of a metaseq model from its model-parallel parts (one part for a singleton)."""
    names = list(parts[0])
    for file, part in zip(files[1:], parts[1:]):
        if set(part) != set(names):
            differ = sorted(set(part) ^ set(names))
            raise CheckpointError(f"{file} and {files[0]} hold different parameters: {', '.join(differ[:10])}")
    _check_tied_output(parts, files)
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{files[0].name.split('-model_part-')[0]}-*"
    tensors: dict[str, LazyTensor] = {}
    for name in names:
        if name in (_VERSION, _OUTPUT_PROJECTION):
            continue  # a format version number and a copy of embed_tokens (checked above)
        pieces = [part[name] for part in parts]
        if ".self_attn.qkv_proj." in name:
            for index, proj in enumerate(_QKV_ORDER):
                new = "model." + name.replace("qkv_proj", proj)
                tensors[new] = joined([_third(p, index, name, source) for p in pieces], 0, new, source)
        else:
            new = _RENAMES.get(name, "model." + name)
            tensors[new] = joined(pieces, _partition_dim(name), new, source)
    return tensors


def _partition_dim(name: str) -> int | None:
    """The dimension model-parallel parts split `name` along; None when every part holds all of it."""
    *_, module, leaf = name.split(".")
    if module in _COLUMN_PARALLEL:
        return 0
    if module in _ROW_PARALLEL and leaf == "weight":
        return 1
    return None


def _third(piece: np.ndarray, index: int, name: str, source: str) -> np.ndarray:
    """Rows index*n .. (index+1)*n of a part's fused qkv tensor (a view)."""
    if piece.ndim not in (1, 2) or piece.shape[0] % 3:
        raise CheckpointError(
            f"{source}: {name}: fused qkv of shape {list(piece.shape)} does not split in three along rows"
        )
    rows = piece.shape[0] // 3
    return piece[index * rows : (index + 1) * rows]


def joined(pieces: list[np.ndarray], dim: int | None, name: str, source: str) -> LazyTensor:
    """One tensor from its model-parallel pieces: concatenated along `dim`, or (dim None) replicated and checked.

    `source` (the files) is named in errors."""
    if len(pieces) == 1:
        return LazyTensor.wrap(pieces[0], name)
    first = pieces[0]
    if dim is None:
        if any(p.shape != first.shape or p.dtype != first.dtype for p in pieces):
            raise CheckpointError(
                f"{source}: {name}: replicated across model parts, but the parts' shapes or dtypes differ"
            )
        return LazyTensor(first.shape, first.dtype, lambda: _replicated(pieces, name, source), name)
    others = [p.shape[:dim] + p.shape[dim + 1 :] for p in pieces]
    if any(p.ndim <= dim or o != others[0] or p.dtype != first.dtype for p, o in zip(pieces, others)):
        shapes = ", ".join(f"{p.dtype}{list(p.shape)}" for p in pieces)
        raise CheckpointError(f"{source}: {name}: model parts do not join along dimension {dim}: {shapes}")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in pieces)
    return LazyTensor(tuple(shape), first.dtype, lambda: np.concatenate(pieces, axis=dim), name)


def _replicated(pieces: list[np.ndarray], name: str, source: str) -> np.ndarray:
    for index, piece in enumerate(pieces[1:], start=1):
        if not same_bits(piece, pieces[0]):
            diff = np.abs(piece.astype(np.float64) - pieces[0].astype(np.float64)).max()
            raise CheckpointError(
                f"{source}: {name} should be replicated across model parts, but part {index} differs from part 0 "
                f"(max abs difference {diff:.3g})"
            )
    return pieces[0]


def _check_tied_output(parts: list[dict[str, np.ndarray]], files: list[Path]) -> None:
    # metaseq saves the tied output layer as a copy of embed_tokens; dropping it is only safe when it is one.
    for file, part in zip(files, parts):
        output = part.get(_OUTPUT_PROJECTION)
        if output is not None and not (_EMBED_TOKENS in part and same_bits(output, part[_EMBED_TOKENS])):
            raise CheckpointError(
                f"{file}: {_OUTPUT_PROJECTION} differs from {_EMBED_TOKENS}; OPT ties its output layer to the "
                "token embedding, and an untied metaseq output layer is not converted"
            )


# ----- configuration


def config_from_checkpoint(tensors: Mapping[str, LazyTensor], options: dict[str, Any], source: str) -> OPTConfig:
    """The OPTConfig of a metaseq model: its model options where present, else what the tensor shapes determine.

    Args:
        tensors: the canonical lazy tensors (`canonical_tensors`).
        options: metaseq's model options (`model_options`), possibly empty.
        source: the checkpoint, for error messages.

    Raises:
        ConfigError: the options contradict the tensors, describe a model OPT cannot represent, or a field the
            shapes cannot determine (the number of attention heads) is missing.
    """
    _check_supported(options, source)
    fields = _shape_fields(tensors, source)
    for field, value in _option_fields(options).items():
        if field == "do_layer_norm_before" and value and not fields.get("do_layer_norm_before", True):
            fields["_remove_final_layer_norm"] = True  # pre-LN without a final norm, not a post-LN model
        elif field in fields and fields[field] != value:
            raise ConfigError(f"{source}: its cfg says {field}={value!r}, but the tensors have {fields[field]!r}")
        fields[field] = value
    if "do_layer_norm_before" not in fields:
        raise ConfigError(f"{source}: without layer-norm weights or a cfg, pre-LN or post-LN cannot be told; {_ASK}")
    if "num_attention_heads" not in fields:
        known = ", ".join(f"{k}={v}" for k, v in fields.items())
        raise ConfigError(f"{source}: the number of attention heads cannot be inferred from shapes ({known}); {_ASK}")
    dtypes = {t.dtype.name for t in tensors.values()}
    return OPTConfig(**fields, dtype=dtypes.pop() if len(dtypes) == 1 else None)


_ASK = "pass --config with a preset (e.g. opt-125m) or a config.json"


def _check_supported(options: dict[str, Any], source: str) -> None:
    if options.get("no_scale_embedding") is False:
        raise ConfigError(f"{source}: scales token embeddings by sqrt(D) (no_scale_embedding=False); OPT does not")
    if options.get("alibi") is True:
        raise ConfigError(f"{source}: uses ALiBi attention biases; OPT uses learned positions")


def _option_fields(options: dict[str, Any]) -> dict[str, Any]:
    fields = {}
    for key, (field, kind) in _CFG_FIELDS.items():
        value = options.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # Unresolved interpolations ("${task.max_target_positions}") and Nones are left to the shapes.
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            fields[field] = value
    return fields


def _shape_fields(tensors: Mapping[str, LazyTensor], source: str) -> dict[str, Any]:
    """Config fields the tensor shapes determine."""
    d = "model.decoder."
    needed = [d + "embed_tokens.weight", d + "embed_positions.weight", d + "layers.0.fc1.weight"]
    absent = [n for n in needed if n not in tensors]
    if absent:
        raise CheckpointError(f"{source}: not an OPT checkpoint: no {', '.join(absent)}")
    tokens, positions = tensors[needed[0]].shape, tensors[needed[1]].shape
    layers = {int(m[1]) for name in tensors if (m := re.match(r"model\.decoder\.layers\.(\d+)\.", name))}
    fields = dict(
        vocab_size=tokens[0],
        word_embed_proj_dim=tokens[1],
        hidden_size=positions[1],
        max_position_embeddings=positions[0] - 2,  # OPT's table has 2 extra rows (positions start at 2)
        num_hidden_layers=len(layers),
        ffn_dim=tensors[needed[2]].shape[0],
        enable_bias=d + "layers.0.fc1.bias" in tensors,
        layer_norm_elementwise_affine=d + "layers.0.self_attn_layer_norm.weight" in tensors,
    )
    if fields["layer_norm_elementwise_affine"]:
        # Post-LN OPT (opt-350m) has no final LayerNorm.
        fields["do_layer_norm_before"] = d + "final_layer_norm.weight" in tensors
    return fields


def load_metaseq(path: Path, config: OPTConfig | None) -> tuple[OPTConfig, dict[str, LazyTensor], list[Path]]:
    """(config, canonical lazy tensors, files) of the metaseq checkpoint at `path`.

    Args:
        path: a folder, a singleton `.pt`, or one of the `*-model_part-N.pt` files.
        config: the configuration to use; None reads it from the checkpoint's cfg and tensor shapes.
    """
    files = find_files(path)
    if not files:
        names = ", ".join(SINGLETON_NAMES)
        raise CheckpointError(f"no metaseq checkpoint at {path}: looked for *-model_part-N.pt and {names}")
    read = [read_part(file) for file in files]
    tensors = canonical_tensors([state for state, _ in read], files)
    if config is None:
        config = config_from_checkpoint(tensors, read[0][1], str(path))
    return config, tensors, files
