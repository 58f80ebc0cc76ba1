"""`from_pretrained` / `save_pretrained` for the PyTorch models: the glue between `opt_core` and `nn.Module`.

Siblings: `opt_tf/pretrained.py`, `opt_flax/pretrained.py`. Everything framework-free (resolving the folder, the
config, reading and checking the checkpoint, a fresh task head, generation_config.json; writing them back) is in
`opt_core.pretrained`. Module attribute names equal canonical names (`opt_core.weights`), so the torch leaf rule is
the identity; a bare `OPTModel` drops the leading `model.` (`opt_core.weights.module_path`).

Loading builds the model on the meta device (no random weights allocated), reads memory-mapped arrays from the
checkpoint and assigns each parameter once in the target dtype, so the model is never held twice. A safetensors
tensor already in that dtype is not copied at all: the parameter is a view of a copy-on-write mapping of the file
(`torch.UntypedStorage.from_file(..., shared=False)`, as HF's loading shares the file), so the weights live in the
OS page cache, a checkpoint larger than free memory still loads, and a write to a parameter (training) makes a
private copy of that page and never reaches the file. A cast copies one tensor at a time and releases the file's
pages behind it (`opt_core.lazy.release_pages`).

LoRA adapters (`add_adapter`, `load_adapter`, ...) come from `opt_torch.lora.LoraMixin`; `canonical_state` and
`save_pretrained` give the base model's weights only, never an adapter's tensors.

int8 weight-only quantization (`quantize("int8")`, `from_pretrained(..., quantize="int8")`, or a folder saved
quantized): the decoder's dense layers become `opt_torch.quantization.Int8Linear`; the rules and the file layout
are `opt_core.quantization`.

Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun) is `opt_torch.distributed`'s: the model
is split on the meta device and each rank assigned only its slices of the memory-mapped checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from opt_core import dtypes, quantization
from opt_core import pretrained as core
from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError, ConfigError
from opt_core.lazy import file_range, release_pages
from opt_core.weights import module_path
from opt_torch import device_map as placement
from opt_torch import distributed
from opt_torch.arrays import numpy_to_torch, torch_to_numpy
from opt_torch.cache import StaticKVCache
from opt_torch.lora import AdapterState, LoraMixin, is_adapter_name
from opt_torch.quantization import Int8Linear

# The torch dtype of each name in `opt_core.dtypes.FLOAT_DTYPES` (float32, float16, bfloat16).
TORCH_DTYPES = {name: getattr(torch, name) for name in dtypes.FLOAT_DTYPES}
# The torch dtype of each float numpy dtype: the tensors that may share the file's memory. Not int8: a file's
# tensors are only 8-byte aligned, and `_weight_int8pack_mm` (torch 2.13, CPU) crashes on an int8 weight that is
# not 64-byte aligned once a batch has more than a few rows; int8 weights are copied into aligned memory.
_SHAREABLE = {np.dtype(dtype): TORCH_DTYPES[name] for name, dtype in dtypes.FLOAT_DTYPES.items()}


def resolve_dtype(dtype: Any, stored: np.dtype | None) -> torch.dtype:
    """float32 by default whatever the checkpoint stores; "auto" keeps the stored dtype (`opt_core.dtypes`)."""
    return TORCH_DTYPES[dtypes.resolve_dtype(dtype, stored)]


class PreTrainedOPT(LoraMixin, nn.Module):
    """Shared by every PyTorch OPT class: weight init, tying, loading and saving, LoRA adapters.

    Subclasses set `head` ("base", "causal_lm", "sequence_classification" or "question_answering").
    """

    head = "base"

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.adapter_state = AdapterState()

    # ----- initialisation and tying

    def post_init(self) -> None:
        """Initialises fresh weights as HF does and ties the LM head; called at the end of each __init__."""
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not module.weight.is_meta:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def tie_weights(self) -> None:
        lm_head = getattr(self, "lm_head", None)
        if lm_head is not None and self.config.tie_word_embeddings:
            lm_head.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self) -> nn.Embedding:
        decoder = self.decoder if hasattr(self, "decoder") else self.model.decoder
        return decoder.embed_tokens

    def set_attn_implementation(self, name: str) -> None:
        """ "sdpa" (default) or "eager" (needed for output_attentions) in every attention module."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {name!r}")
        for module in self.modules():
            if hasattr(module, "attn_implementation"):
                module.attn_implementation = name

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device, or a dispatched model's main device (`opt_torch.device_map`)."""
        main = getattr(self, "_main_device", None)
        return main if main is not None else next(self.parameters()).device

    @property
    def is_dispatched(self) -> bool:
        """Placed over several devices or the disk by `from_pretrained(..., device_map=...)` (accelerate's hooks)."""
        return getattr(self, "_main_device", None) is not None

    def init_cache(self, batch_size: int, max_length: int) -> StaticKVCache:
        """An empty static cache (`opt_torch.cache.StaticKVCache`) of max_length slots, in the model's dtype and
        on its device (each layer's on the device it computes on, for a dispatched model); forward it with
        `cache_position` and an attention mask over all max_length slots."""
        config = self.config
        tp_size = getattr(self, "tp_size", 1)
        if tp_size > 1:  # this rank's heads only (opt_torch.distributed): N / tp heads of the same head dim
            heads, hidden = config.num_attention_heads // tp_size, config.hidden_size // tp_size
            config = config.replace(num_attention_heads=heads, hidden_size=hidden)
        return StaticKVCache(config, batch_size, max_length, self.dtype, self._layer_devices())

    def _layer_devices(self) -> torch.device | list[torch.device]:
        if not self.is_dispatched:
            return self.device
        prefix = "decoder.layers" if self.head == "base" else "model.decoder.layers"
        placed = (placement.place(f"{prefix}.{i}", self.hf_device_map) for i in range(self.config.num_hidden_layers))
        return [self._main_device if placement.offloaded(d, self._main_device) else torch.device(d) for d in placed]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- canonical names

    def canonical_state(self) -> dict[str, np.ndarray]:
        """{canonical name: numpy array} of every base parameter (tied ones once; a merged adapter's deltas
        included, an adapter's own tensors never)."""
        prefix = "model." if self.head == "base" else ""
        offloaded = getattr(self, "_offloaded_weights", {})  # a dispatched model's weights kept off the model
        return {  # a tensor-parallel model's split weights gathered whole: every rank calls this then
            prefix + k: torch_to_numpy(distributed.full(v.float() if _is_scale(k) else v))  # int8 scales: fp32
            for k, v in self.state_dict().items()
            if not is_adapter_name(k)
            for v in [offloaded[k] if v.is_meta and k in offloaded else v]
        }

    # ----- int8 weight-only quantization

    @property
    def is_quantized(self) -> bool:
        return any(isinstance(module, Int8Linear) for module in self.modules())

    def quantize(self, method: str = "int8"):
        """Quantizes the decoder's dense weights to int8 in place (`opt_core.quantization`: per output channel,
        symmetric; embeddings, norms, biases and the heads stay float); returns the model.

        The model then computes its dense layers with `torch.ops.aten._weight_int8pack_mm` on CPU
        (`opt_torch.quantization`), and `save_pretrained` writes compressed-tensors' int8 layout, which HF
        transformers reads too. Adapters go on after quantizing (LoRA over the frozen int8 base).

        Args:
            method: "int8".
        """
        _check_quantize(method)
        if self.is_dispatched:
            raise ConfigError("a model dispatched by device_map cannot be quantized: load it with quantize='int8'")
        if self.adapter_state.plans:
            raise ValueError("quantize the model before adding adapters: this one has " + str(list(self.peft_config)))
        if self.is_quantized:
            return self
        for name in quantization.quantized_weight_names(self.config, self.head):
            path = module_path(name.removesuffix(".weight"), self.head)
            linear = self.get_submodule(path)
            q, scale = quantization.quantize_int8(torch_to_numpy(linear.weight))
            device = linear.weight.device
            weight, scale = torch.from_numpy(q).to(device), torch.from_numpy(scale).to(device)
            self._replace(path, Int8Linear.from_linear(linear, weight, scale))
        self.config = quantization.with_quantization_config(self.config, True)
        return self

    def _int8_layers_on_meta(self) -> None:
        """Empty Int8Linears (meta device) in place of the layers a quantized checkpoint holds int8."""
        for name in quantization.quantized_weight_names(self.config, self.head):
            path = module_path(name.removesuffix(".weight"), self.head)
            linear = self.get_submodule(path)
            int8 = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
            self._replace(path, int8)

    # ----- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: Any = None,
        torch_dtype: Any = None,
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = "default",
        quantize: str | None = None,
        tp_plan: str | None = None,
        device_mesh=None,
        device_map: Any = None,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        """Loads a model from a local folder, the HF cache, or the hub; with `adapter`, then a PEFT LoRA adapter.

        Args:
            name_or_path: a folder written by `save_pretrained` (here or by HF), or a hub id.
            dtype: float32 by default, whatever the checkpoint stores; "auto" keeps the stored dtype;
                float16 / bfloat16. `torch_dtype` is an alias.
            attn_implementation: "sdpa" (default) or "eager".
            device: where to put the weights (default CPU).
            adapter: a PEFT adapter folder or hub id, loaded after the base (`load_adapter`; its tensors stay
                float32), with the hub options `token` and `local_files_only` given here.
            adapter_name: the adapter's name.
            quantize: "int8" quantizes the dense weights while loading (`quantize`), never holding them in float
                as tensors. A folder saved quantized (its config.json's `quantization_config`) loads int8
                whatever this says; `dtype` then applies to the weights that stay float.
            tp_plan: "auto" splits each decoder layer over the processes `torchrun` started (tensor parallelism
                through DTensor, `opt_torch.distributed`): joins the process group if need be, and each rank reads
                only its slices of the split weights. Every rank then runs the same forward or `generate`.
            device_mesh: with tp_plan, a 1-D `DeviceMesh` to split over (default: every process).
            device_map: where each module's weights live, as in HF transformers with accelerate
                (`opt_torch.device_map`): "cpu", "cuda:1", a GPU index; "auto", "balanced", "balanced_low_0" or
                "sequential" for accelerate to fill the GPUs, then the CPU, then the disk; or a dict of module name
                -> device (an int, "cpu", "cuda:N", "disk"). The model's `hf_device_map` says where each went.
            max_memory: with a device_map strategy, the most each device may hold, e.g. {0: "10GiB", "cpu":
                "30GiB"} (default: what each has free).
            offload_folder: where weights the map puts on "disk" are written when the checkpoint cannot be read
                in place (safetensors and .bin files are read from where they are).
            **kwargs: the loading options every framework shares (`opt_core.pretrained.load_pretrained`): `config`
                (instead of the folder's config.json), `fmt` (the format to read when the folder holds several),
                `revision`, `cache_dir`, `local_files_only`, `token` (huggingface_hub, for hub ids), and config
                fields to override as HF does (e.g. `num_labels=3`).
        """
        # torch.manual_seed controls a fresh head's init; the seed is drawn only when a head is missing.
        seed = lambda: int(torch.randint(2**31 - 1, ()).item())  # noqa: E731
        if quantize is not None:
            _check_quantize(quantize)
        if tp_plan is not None:
            _check_tensor_parallel(tp_plan, quantize, adapter)
        if device_map is not None:
            device_map = _check_device_map(device_map, device, tp_plan)
        loaded = core.load_pretrained(name_or_path, cls.head, seed=seed, keep_int8=True, **kwargs)
        config, tensors = loaded.config, loaded.tensors
        if quantize is not None and not quantization.has_scales(tensors):
            tensors = quantization.quantize_state(tensors, config, cls.head)
            config = quantization.with_quantization_config(config, True)
        target = resolve_dtype(dtype if dtype is not None else torch_dtype, loaded.stored_dtype)
        with torch.device("meta"), _no_normal_init():
            model = cls(config)
        if quantization.has_scales(tensors):
            if tp_plan is not None:
                raise ConfigError(f"tp_plan={tp_plan!r} with an int8 checkpoint is not supported: {loaded.folder}")
            model._int8_layers_on_meta()
        if tp_plan is not None:
            model._assign_tensor_parallel(tensors, target, device_mesh)
        elif device_map is not None:
            model._assign_device_map(tensors, target, device_map, max_memory, offload_folder)
        else:
            model._assign(tensors, target, device)
        if hasattr(model, "generate"):
            model.generation_config = loaded.generation_config
        model.set_attn_implementation(attn_implementation)
        if adapter is not None:
            hub = {k: kwargs[k] for k in ("token", "local_files_only") if k in kwargs}
            model.load_adapter(adapter, adapter_name, **hub)
        return model.eval()

    def _assign(self, tensors: dict[str, np.ndarray], dtype: torch.dtype, device) -> None:
        mappings: dict[str, torch.UntypedStorage] = {}  # one copy-on-write mapping per file
        state = {module_path(k, self.head): _tensor(k, v, dtype, device or "cpu", mappings) for k, v in tensors.items()}
        self._assign_state(state)

    def _assign_tensor_parallel(self, tensors: dict[str, np.ndarray], dtype: torch.dtype, device_mesh) -> None:
        """Splits the (meta) model over the mesh, then assigns each rank its slices of the checkpoint."""
        mesh = distributed.tensor_parallel_mesh(device_mesh)
        distributed.parallelize(self, mesh)
        state = {module_path(name, self.head): array for name, array in tensors.items()}
        self._assign_state(distributed.shard_state(self, state, dtype, distributed.local_device()))

    def _assign_device_map(self, tensors, dtype: torch.dtype, device_map, max_memory, offload_folder) -> None:
        """Places each weight where the (planned) device map says; weights offloaded to the disk, or to the CPU
        while a GPU computes, are handed to accelerate's hooks through `device_map.OffloadedWeights`."""
        device_map = placement.plan(self, device_map, max_memory, dtype)
        if not placement.is_dispatched(device_map):
            self._assign(tensors, dtype, next(iter(device_map.values())))
            self.hf_device_map = device_map
            return
        if self.is_quantized:
            raise ConfigError(f"int8 weights cannot be dispatched over devices: device_map={device_map}")
        main = placement.main_device(device_map)
        folder = Path(offload_folder) if offload_folder is not None else None
        weights, state, mappings = placement.OffloadedWeights(dtype), {}, {}
        for name, array in tensors.items():
            path = module_path(name, self.head)
            where = placement.place(path, device_map)
            if where == "disk":
                weights.add(path, placement.disk_source(path, array, dtype, folder))
                continue
            state[path] = _tensor(name, array, dtype, where, mappings)
            if placement.offloaded(where, main):
                weights.add(path, state[path])
        tied = placement.tied_head(self)
        if tied is not None:
            weights.alias(*tied)
        self._assign_state(state, offloaded=set(weights))
        placement.dispatch(self, device_map, weights)
        self._offloaded_weights = weights
        self._main_device = main

    def _assign_state(self, state: dict[str, torch.Tensor], offloaded: set[str] = frozenset()) -> None:
        result = self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        left = [k for k in result.missing_keys if k not in tied and k not in offloaded]
        if left or result.unexpected_keys:
            raise CheckpointError(f"internal: parameters not assigned {left} / {result.unexpected_keys}")

    # ----- saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool | None = None,
        fmt: str | None = None,
        max_shard_size: int | str = "5GB",
        dtype: Any = None,
    ) -> list[Path]:
        """Writes config.json, generation_config.json and the weights as HF does; returns the weight files.

        Args:
            save_directory: the folder; created if needed.
            safe_serialization: safetensors (the default, as HF PyTorch) or, when False, pytorch_model.bin.
            fmt: any format of `opt_core.formats` ("safetensors", "pytorch", "tf", "flax"); wins when given.
            max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
            dtype: cast the weights on the way out (default: the model's dtype); of a quantized model, the
                weights that stayed float.

        A quantized model (`quantize`) is written in compressed-tensors' naive-quantized int8 layout
        (`opt_core.quantization`: safetensors only, int8 weights with `{module}.weight_scale` float32 scales
        [out, 1], a `quantization_config` in config.json), which HF transformers loads through the
        compressed-tensors package.

        A tensor-parallel model (`tp_plan`) is gathered on every rank and written once, by rank 0; every rank
        returns once the files are in place (the others with an empty list).
        """
        state = self.canonical_state()
        if getattr(self, "tp_size", 1) > 1 and not distributed.is_main_process():
            distributed.barrier()
            return []
        files = core.save_pretrained(
            save_directory,
            state,
            self.config,
            self.head,
            architecture=type(self).__name__,
            generation_config=getattr(self, "generation_config", None),
            fmt=core.save_format(safe_serialization, fmt, native="pytorch", safe_by_default=True),
            max_shard_size=max_shard_size,
            dtype=dtype,
        )
        if getattr(self, "tp_size", 1) > 1:
            distributed.barrier()
        return files


@contextlib.contextmanager
def _no_normal_init():
    """`torch.nn.init.normal_` does nothing while a model is built on the meta device for loading.

    nn.Embedding draws its init in its constructor, and `normal_` on a meta tensor imports torch._dynamo (about
    840 modules, 80 MB resident, measured with torch 2.13) for values that are never used: every parameter is then
    assigned from the checkpoint. HF transformers skips these inits the same way while loading.
    """
    original = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.nn.init.normal_ = original


def _check_quantize(method: Any) -> None:
    if method not in quantization.QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(quantization.QUANTIZE_CHOICES)}, got {method!r}")


def _check_device_map(device_map: Any, device: Any, tp_plan: Any) -> dict | str:
    for name, value in (("device", device), ("tp_plan", tp_plan)):
        if value is not None:
            raise ConfigError(f"device_map={device_map!r} with {name}={value!r}: give only one of them")
    return placement.normalize(device_map)


def _check_tensor_parallel(tp_plan: Any, quantize: str | None, adapter) -> None:
    distributed.check_tp_plan(tp_plan)
    for name, value in (("quantize", quantize), ("adapter", adapter)):
        if value is not None:
            raise ConfigError(f"tp_plan={tp_plan!r} with {name}={value!r} is not supported: load without one of them")


def _is_scale(name: str) -> bool:
    return name.endswith(".weight" + quantization.SCALE_SUFFIX)


def _file_backed(array: np.ndarray, dtype: torch.dtype, mappings: dict) -> torch.Tensor | None:
    """`array` as a CPU tensor over a copy-on-write mapping of its file, when it is a memory-mapped float tensor
    stored in `dtype`; None when it needs a copy (a cast, int8, a file not mapped).

    One mapping per file (`mappings`, path -> storage) serves all its tensors; pages are read when first used,
    and a write makes a private copy of the page (the file never changes).
    """
    where = file_range(array)
    if where is None or _SHAREABLE.get(np.dtype(array.dtype)) != dtype or where.offset % dtype.itemsize:
        return None
    storage = mappings.get(where.path)
    if storage is None:
        size = os.path.getsize(where.path)
        storage = mappings[where.path] = torch.UntypedStorage.from_file(where.path, shared=False, nbytes=size)
    return torch.empty(0, dtype=dtype).set_(storage, where.offset // dtype.itemsize, array.shape)


def _tensor(name: str, array: np.ndarray, dtype: torch.dtype, device, mappings: dict) -> torch.Tensor:
    """Checkpoint tensor `name` on `device`: on the CPU a view of its file's copy-on-write mapping where the dtype
    allows (`_file_backed`), else a copy, with the file's pages released behind it."""
    target = _stored_as(name, array, dtype)
    tensor = _file_backed(array, target, mappings) if torch.device(device).type == "cpu" else None
    if tensor is None:
        tensor = numpy_to_torch(array, target).to(device)
        release_pages(array)  # the copy is made: the file's pages need not stay in this process
    return tensor


def _stored_as(name: str, array: np.ndarray, dtype: torch.dtype) -> torch.dtype:
    """The torch dtype a loaded tensor takes: int8 weights stay int8 and their scales float32; the rest `dtype`."""
    if np.dtype(array.dtype) == np.int8:
        return torch.int8
    return torch.float32 if _is_scale(name) else dtype
