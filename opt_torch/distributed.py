"""The PyTorch models on `torch.distributed`: tensor parallelism through DTensor, and data-parallel training
(FSDP2's `fully_shard`, or DDP). No communication of our own: every collective is torch's.

Started under `torchrun`, each process reads its rank and the world size from the environment that torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `init_distributed` joins the process group over NCCL
where CUDA is available and over gloo on CPU, the same code path either way.

* Tensor parallelism (`from_pretrained(..., tp_plan="auto")`, as HF's): `parallelize_module` splits each decoder
  layer Megatron-style over a 1-D device mesh of all the processes. `q_proj`, `k_proj`, `v_proj` and `fc1` are
  column-wise (their output dim, hence whole heads and FFN units, is split; each rank computes its heads with no
  communication), `out_proj` and `fc2` row-wise (their input dim is split; the partial sums are all-reduced, the
  bias added once). Embeddings, norms, projections and heads stay whole on every rank. The rule is stated on the
  canonical `[out, in]` weights once, in `opt_core.weights.TENSOR_PARALLEL`, for this module and `opt_flax.sharding`.
  Loading builds the model on the meta device, shards it there, and gives each rank only its slices of the
  memory-mapped checkpoint (`shard_state`), so no rank materialises a whole split weight.
* Data parallelism (`opt_torch.train` under torchrun): `fully_shard` per decoder layer and then on the whole model
  (FSDP2, the default), or `DistributedDataParallel`; each rank takes its contiguous share of every micro-batch,
  so the processes together see the one-process batch (`local_rows`).

`torch.distributed.tensor` takes seconds to import, so it is imported where it is used: a model in one process
never imports it.

Siblings: `opt_flax/sharding.py` (a JAX mesh); Keras has none yet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from opt_core.config import OPTConfig
from opt_core.errors import ConfigError
from opt_core.weights import DENSE_WEIGHT, TENSOR_PARALLEL, VOCABULARY_MODULES, module_path, parameter_specs
from opt_torch.arrays import numpy_to_torch

# The decoder layers' part of opt_core.weights.TENSOR_PARALLEL (embeddings and the LM head stay whole here).
_LAYER_SPLITS = {module: dim for module, dim in TENSOR_PARALLEL.items() if module not in VOCABULARY_MODULES}
COLUMN_WISE = tuple(module for module, dim in _LAYER_SPLITS.items() if dim == 0)
ROW_WISE = tuple(module for module, dim in _LAYER_SPLITS.items() if dim == 1)
TP_PLANS = ("auto",)


# ----- the process group


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or another launcher) started."""
    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> torch.device:
    """Joins the process group torchrun describes (NCCL with CUDA, else gloo), once; returns this rank's device."""
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ConfigError(
                f"torch.distributed needs {', '.join(missing)} in the environment: start the script with "
                "`torchrun --nproc-per-node N script.py`"
            )
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return local_device()


def local_device() -> torch.device:
    """cuda:LOCAL_RANK where CUDA is available (and made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----- tensor parallelism


def check_tp_plan(tp_plan: Any) -> None:
    if tp_plan not in TP_PLANS:
        raise ConfigError(f"tp_plan must be one of {', '.join(map(repr, TP_PLANS))} or None, got {tp_plan!r}")


def tensor_parallel_mesh(device_mesh=None):
    """`device_mesh` (1-D `DeviceMesh`), or one over every process of the group, joined first if need be."""
    from torch.distributed.device_mesh import init_device_mesh

    device = init_distributed()
    if device_mesh is None:
        return init_device_mesh(device.type, (dist.get_world_size(),))
    if device_mesh.ndim != 1:
        raise ConfigError(f"device_mesh must be 1-D for tensor parallelism, got {device_mesh.ndim} dims")
    return device_mesh


def check_divisible(config: OPTConfig, tp_size: int) -> None:
    """Whole heads and FFN units on each rank."""
    for name in ("num_attention_heads", "ffn_dim"):
        if getattr(config, name) % tp_size:
            raise ConfigError(f"{name}={getattr(config, name)} is not divisible by the {tp_size} tensor-parallel ranks")


def tensor_parallel_plan(config: OPTConfig, head: str) -> dict[str, Any]:
    """{module path: ColwiseParallel() or RowwiseParallel()} for `parallelize_module`, from the parameter table's
    dense weights."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for spec in parameter_specs(config, head):
        module = spec.name.removesuffix(".weight")
        kind = module.rsplit(".", 1)[-1]
        if spec.kind == DENSE_WEIGHT and kind in COLUMN_WISE + ROW_WISE:
            plan[module_path(module, head)] = ColwiseParallel() if kind in COLUMN_WISE else RowwiseParallel()
    return plan


def parallelize(model: nn.Module, mesh) -> nn.Module:
    """Splits `model`'s decoder layers over `mesh` (on the meta device too: nothing is then communicated)."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_divisible(model.config, mesh.size())
    parallelize_module(model, mesh, tensor_parallel_plan(model.config, model.head))
    model.tp_size = mesh.size()
    return model


def shard_state(model: nn.Module, state: Mapping[str, np.ndarray], dtype: torch.dtype, device) -> dict:
    """{module path: tensor} to assign: this rank's slice of each split parameter as a DTensor (only those bytes
    are read from a memory-mapped array), every other parameter whole."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    tensors = {}
    for path, array in state.items():
        param = params.get(path)
        if isinstance(param, DTensor):
            local = numpy_to_torch(local_slice(array, param), dtype).to(device)
            tensors[path] = DTensor.from_local(
                local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        else:
            tensors[path] = numpy_to_torch(array, dtype).to(device)
    return tensors


def local_slice(array: np.ndarray, param) -> np.ndarray:
    """This rank's block of the whole `array` under the placements of the DTensor `param` (a view: nothing is
    copied or read)."""
    from torch.distributed.tensor import Shard

    index: list[slice] = [slice(None)] * array.ndim
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            size = array.shape[placement.dim] // param.device_mesh.size(mesh_dim)
            start = param.device_mesh.get_local_rank(mesh_dim) * size
            index[placement.dim] = slice(start, start + size)
    return array[tuple(index)]


# ----- data parallelism


def shard_for_training(model: nn.Module, kind: str, device: torch.device) -> nn.Module:
    """FSDP2 (`fully_shard` per decoder layer, then the root: the embeddings, norms and heads) in place, or a DDP
    wrapper; returns what the trainer calls forward on."""
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if kind != "fsdp":
        raise ConfigError(f"data_parallel must be 'fsdp' or 'ddp', got {kind!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Frees the gathered weights of an FSDP2 model (a no-op otherwise): its parameters are the shards again."""
    if hasattr(model, "reshard"):
        model.reshard()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.decoder if hasattr(model, "decoder") else model.model.decoder
    return decoder.layers


def local_rows(batch_size: int) -> slice:
    """This rank's contiguous share of a micro-batch of `batch_size` rows (all of it in one process)."""
    if not dist.is_initialized():
        return slice(None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {world} data-parallel processes")
    share = batch_size // world
    return slice(rank * share, (rank + 1) * share)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over every process (the value itself in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def data_parallel_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered: every rank must call it), a plain tensor as it is."""
    if not dist.is_initialized():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (whole, on every rank) placed as `param` is: its local block when `param` is a DTensor."""
    if not dist.is_initialized():
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    value = value.to(param.device)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
