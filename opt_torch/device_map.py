"""`device_map` for the PyTorch `from_pretrained`: accelerate's big-model placement, with HF transformers' meaning.

A device map names, for each module of the model, where its weights live: a GPU (an int or "cuda:N"), "cpu", or
"disk". Its keys are module names of the model ("model.decoder.layers.3", "lm_head", "" for the whole model); a
parameter goes where the longest key that is a prefix of its name says. As in HF:

* `device_map="cpu"`, `"cuda:1"`, `0`, a `torch.device`: the whole model on that device (`"cuda"` is the local
  rank's GPU under torchrun);
* `"auto"`, `"balanced"`, `"balanced_low_0"`, `"sequential"`: accelerate's `infer_auto_device_map` fills the GPUs,
  then the CPU, then the disk, within `max_memory` (default: what each device has free), never splitting a
  decoder layer (HF's OPT `_no_split_modules`); "auto" and "balanced" spread the layers evenly over the GPUs;
* a dict such as `{"model.decoder.embed_tokens": 0, "model.decoder.layers.0": 0, ..., "lm_head": "disk"}`.

A map with more than one device, or with "disk", is carried out by `accelerate.dispatch_model`: its hooks move
each module's inputs to the module's execution device (the main device, the first GPU of the map or the CPU, for
weights on "cpu" or "disk" when a GPU computes) and bring offloaded weights in for the module's forward only. The
offloaded weights come from `OffloadedWeights`: a weight on "disk" is read from the checkpoint file, which stays
memory-mapped (a safetensors or `.bin` file, as HF reads safetensors in place); a checkpoint that cannot be mapped
(a TF `.h5`, a Flax msgpack) has its disk weights written once to `offload_folder`, one safetensors file per
weight, as HF writes them there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from opt_core.dtypes import to_numpy_dtype
from opt_core.errors import ConfigError
from opt_core.files import atomic_path
from opt_core.lazy import copy_released, file_range, release_pages
from opt_core.safetensors_file import read_safetensors, write_safetensors
from opt_torch.arrays import numpy_to_torch

# The strings that ask accelerate to plan the placement (HF's list).
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# A decoder layer is never split over two devices: HF's OPT `_no_split_modules`.
NO_SPLIT_MODULES = ["OPTDecoderLayer"]
# Where a tied LM head's weight lives: with the token embeddings (the same Parameter).
TIED = ("lm_head", "decoder.embed_tokens")


def normalize(device_map: Any) -> dict[str, Any] | str:
    """A map, or one of `STRATEGIES`, from what a user may pass (HF's forms); a clear error for anything else."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, Mapping):
        if not device_map:
            raise ConfigError("device_map is an empty dict: name a device for every module (or {'': 'cpu'})")
        return {_key(key): _device(value, f"device_map[{key!r}]") for key, value in device_map.items()}
    if isinstance(device_map, str) and device_map == "cuda":  # HF: the local rank's GPU under torchrun
        device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return {"": _device(device_map, "device_map")}


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"device_map keys are module names (str), got {key!r}")
    return key


def _device(value: Any, what: str) -> int | str | torch.device:
    """A GPU index, "cpu", "disk" or a torch.device; a device this machine lacks is refused here, by name."""
    if value == "disk":
        return "disk"
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ConfigError(f"{what}={value!r} is not a device: a GPU index >= 0, 'cpu', 'cuda:N', 'mps' or 'disk'")
    try:
        device = torch.device(value)  # an int is a CUDA index, as in accelerate
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{what}={value!r} is not a device: a GPU index >= 0, 'cpu', 'cuda:N', 'mps', 'disk', or one of "
            + ", ".join(map(repr, STRATEGIES))
        ) from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{what}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cpu":
        return "cpu"
    return value if isinstance(value, int) else device


def plan(model: nn.Module, device_map: dict | str, max_memory: dict | None, dtype: torch.dtype) -> dict[str, Any]:
    """The module -> device map for `model` (on the meta device): a strategy planned by accelerate, or the
    user's map checked against the model."""
    if isinstance(device_map, dict):
        if max_memory is not None:
            raise ConfigError("max_memory applies to device_map='auto' and the other strategies, not to a dict")
        check(model, device_map)
        return device_map
    accelerate = _accelerate()
    if device_map == "sequential":
        budget = accelerate.utils.get_max_memory(max_memory)
    else:
        budget = accelerate.utils.get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=NO_SPLIT_MODULES,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    planned = accelerate.infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=NO_SPLIT_MODULES, dtype=dtype
    )
    return {key: _device(value, f"device_map[{key!r}]") for key, value in planned.items()}


def check(model: nn.Module, device_map: dict[str, Any]) -> None:
    """Every key names a module of `model`, every parameter is placed, and a tied LM head sits with the token
    embeddings it shares its weight with; each error names the module or parameter."""
    modules = dict(model.named_modules())
    unknown = [key for key in device_map if key not in modules]
    if unknown:
        raise ConfigError(f"device_map names modules {type(model).__name__} does not have: {', '.join(unknown)}")
    unplaced = [name for name in parameter_names(model) if place(name, device_map) is None]
    if unplaced:
        raise ConfigError(f"device_map places no device for these parameters: {', '.join(unplaced)}")
    tied = tied_head(model)
    if tied is not None:
        head, embeddings = (place(name, device_map) for name in tied)
        if head != embeddings:
            raise ConfigError(
                f"device_map puts {tied[0]} on {head!r} and {tied[1]} on {embeddings!r}, but they share one weight "
                "(tie_word_embeddings): place both modules on one device"
            )


def parameter_names(model: nn.Module) -> list[str]:
    """Every parameter and buffer, tied ones under each of their names (as accelerate's hooks look them up)."""
    return [name for name, _ in model.named_parameters(remove_duplicate=False)] + [
        name for name, _ in model.named_buffers(remove_duplicate=False)
    ]


def tied_head(model: nn.Module) -> tuple[str, str] | None:
    """(LM head weight, token embedding weight) names when the two are one Parameter."""
    named = dict(model.named_parameters(remove_duplicate=False))
    head = named.get(f"{TIED[0]}.weight")
    embedding = [name for name in named if name.endswith(f"{TIED[1]}.weight")]
    if head is not None and embedding and named[embedding[0]] is head:
        return f"{TIED[0]}.weight", embedding[0]
    return None


def place(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device of parameter `name`: the value of the longest key that is a prefix of it (None: not placed)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    return None


def is_dispatched(device_map: Mapping[str, Any]) -> bool:
    """accelerate's hooks are needed: the map uses more than one device, or the disk."""
    devices = set(map(str, device_map.values()))
    return len(devices) > 1 or "disk" in devices


def main_device(device_map: Mapping[str, Any]) -> torch.device:
    """Where inputs go and offloaded weights compute: the first device of the map that is neither the CPU nor the
    disk, else the CPU (accelerate's choice)."""
    accelerators = [value for value in device_map.values() if value not in ("cpu", "disk")]
    return torch.device(accelerators[0] if accelerators else "cpu")


def offloaded(device: Any, main: torch.device) -> bool:
    """A weight on `device` is brought in for each forward: on the disk, or on the CPU while a GPU computes."""
    return device == "disk" or (device == "cpu" and main.type != "cpu")


class OffloadedWeights(Mapping):
    """{parameter name: tensor} for the offloaded weights, each read when accelerate's hook asks for it.

    A weight that is a memory-mapped view of its checkpoint file is read from the file at every use (a cast
    makes a new tensor each time, released after the module's forward); a weight kept on the CPU for a GPU is a
    CPU tensor held here.

    Args:
        dtype: the model's dtype for float weights.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._sources: dict[str, np.ndarray | torch.Tensor] = {}

    def add(self, name: str, source: np.ndarray | torch.Tensor) -> None:
        self._sources[name] = source

    def alias(self, name: str, same_as: str) -> None:
        """`name` is another name of `same_as`'s weight (a tied LM head)."""
        if same_as in self._sources:
            self._sources[name] = self._sources[same_as]

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._sources[name]
        if isinstance(source, torch.Tensor):
            return source
        tensor = numpy_to_torch(source, self.dtype)
        release_pages(source)  # the copy is made: the file's pages need not stay in this process
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def disk_source(name: str, array: np.ndarray, dtype: torch.dtype, offload_folder: Path | None) -> np.ndarray:
    """A memory-mapped array of weight `name` to read at each use: the checkpoint's own bytes when the file is
    mapped, else a copy in `dtype` written once to `offload_folder/{name}.safetensors` and mapped from there."""
    if file_range(array) is not None:
        return array
    if offload_folder is None:
        raise ConfigError(
            f"device_map puts {name} on the disk, but its checkpoint cannot be read in place (only safetensors and "
            "PyTorch .bin files can): pass offload_folder= for the weights to be written to"
        )
    offload_folder.mkdir(parents=True, exist_ok=True)
    path = offload_folder / f"{name}.safetensors"
    with atomic_path(path) as partial:
        write_safetensors({name: copy_released(array, to_numpy_dtype(str(dtype).removeprefix("torch.")))}, partial)
    return read_safetensors(path)[name]


def dispatch(model: nn.Module, device_map: dict[str, Any], weights: OffloadedWeights) -> None:
    """Attaches accelerate's hooks: inputs follow the modules, offloaded weights come from `weights`."""
    accelerate, main = _accelerate(), main_device(device_map)
    # accelerate reads `state_dict` entries lazily (`OffloadedWeightsLoader`); an empty offload index tells it the
    # disk weights are already where they will be read from, so it writes nothing of its own.
    accelerate.dispatch_model(
        model,
        device_map,
        main_device=main if main.type != "cpu" else "cpu",  # accelerate tells the CPU by the string
        state_dict=weights,
        offload_index={},
        skip_keys="past_key_values",
    )


def _accelerate():
    try:
        import accelerate
        import accelerate.utils
    except ImportError:
        raise ConfigError("device_map needs accelerate: pip install accelerate (or opt-lm[torch])") from None
    return accelerate
