"""`from_pretrained` / `save_pretrained` for the PyTorch models: the glue between `opt_core` and `nn.Module`.

Siblings: `opt_tf/pretrained.py`, `opt_flax/pretrained.py`. Module attribute names equal canonical names
(`opt_core.weights`), so the torch leaf rule is the identity; a bare `OPTModel` drops the leading `model.`.

Loading builds the model on the meta device (no random weights allocated), reads memory-mapped arrays from the
checkpoint and assigns each parameter once in the target dtype, so the model is never held twice.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import nn

from opt_core.checkpoint import load_checkpoint, save_checkpoint
from opt_core.config import OPTConfig
from opt_core.errors import CheckpointError
from opt_core.generation import load_generation_config
from opt_core.hub import resolve_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Any, stored: np.dtype | None) -> torch.dtype:
    """float32 by default whatever the checkpoint stores; "auto" keeps the stored dtype."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return _DTYPES.get(str(stored), torch.float32) if stored is not None else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', float32, float16 or bfloat16")
    return _DTYPES[key]


def numpy_to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor of `dtype` from a (possibly read-only, memory-mapped, strided) array."""
    if array.dtype == ml_dtypes.bfloat16:
        array = array.view(np.int16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we copy below, never write
            tensor = torch.from_numpy(array).view(torch.bfloat16)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    return tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class PreTrainedOPT(nn.Module):
    """Shared by every PyTorch OPT class: weight init, tying, loading and saving.

    Subclasses set `head` ("base", "causal_lm", "sequence_classification" or "question_answering").
    """

    head = "base"

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config

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
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- canonical names

    def _module_name(self, canonical: str) -> str:
        return canonical.removeprefix("model.") if self.head == "base" else canonical

    def canonical_state(self) -> dict[str, np.ndarray]:
        """{canonical name: numpy array} of every parameter (tied ones once)."""
        prefix = "model." if self.head == "base" else ""
        return {prefix + k: torch_to_numpy(v) for k, v in self.state_dict().items()}

    # ----- loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        config: OPTConfig | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        fmt: str | None = None,
        **config_overrides: Any,
    ):
        """Loads a model from a local folder, the HF cache, or the hub.

        Args:
            name_or_path: a folder written by `save_pretrained` (here or by HF), or a hub id.
            config: use this config instead of the folder's config.json.
            dtype: float32 by default, whatever the checkpoint stores; "auto" keeps the stored dtype;
                float16 / bfloat16. `torch_dtype` is an alias.
            attn_implementation: "sdpa" (default) or "eager".
            device: where to put the weights (default CPU).
            revision, cache_dir, local_files_only, token: passed to huggingface_hub for hub ids.
            fmt: read this checkpoint format ("safetensors", "pytorch", "tf", "flax") when the folder has several.
            **config_overrides: config fields to override, as HF (e.g. `num_labels=3`).
        """
        folder = resolve_model(
            name_or_path,
            formats=(fmt,) if fmt else None,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        if config is None:
            config = OPTConfig.from_pretrained(folder, **config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        match = load_checkpoint(folder, config, cls.head, fmt=fmt)
        stored = match.tensors["model.decoder.embed_tokens.weight"].dtype
        target = resolve_dtype(dtype if dtype is not None else torch_dtype, stored)
        with torch.device("meta"):
            model = cls(config)
        model._assign(match, target, device)
        if hasattr(model, "generate"):
            model.generation_config = load_generation_config(folder, config)
        model.set_attn_implementation(attn_implementation)
        return model.eval()

    def _assign(self, match, dtype: torch.dtype, device) -> None:
        device = torch.device(device or "cpu")
        state = {
            self._module_name(name): numpy_to_torch(array, dtype).to(device) for name, array in match.tensors.items()
        }
        for spec in match.missing_head_params:
            fresh = torch.empty(spec.shape, dtype=dtype, device=device)
            if spec.kind == "dense_bias":
                nn.init.zeros_(fresh)
            else:
                nn.init.normal_(fresh, mean=0.0, std=self.config.init_std)
            state[self._module_name(spec.name)] = fresh
        result = self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()
        left = [k for k in result.missing_keys if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if left or result.unexpected_keys:
            raise CheckpointError(f"internal: parameters not assigned {left} / {result.unexpected_keys}")

    # ----- saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool = True,
        max_shard_size: int | str = "5GB",
    ) -> list[Path]:
        """Writes config.json and the weights (model.safetensors, or pytorch_model.bin) as HF does.

        Args:
            save_directory: the folder; created if needed.
            safe_serialization: safetensors (default) or pytorch_model.bin.
            max_shard_size: shard above this size ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
        """
        folder = Path(save_directory)
        config = self.config.replace(dtype=str(self.dtype).removeprefix("torch."))
        config.extra["architectures"] = [type(self).__name__]
        config.save_pretrained(folder)
        if getattr(self, "generation_config", None) is not None:
            self.generation_config.save_pretrained(folder)
        fmt = "safetensors" if safe_serialization else "pytorch"
        return save_checkpoint(
            self.canonical_state(),
            folder,
            config,
            self.head,
            fmt=fmt,
            max_shard_size=max_shard_size,
        )
