"""Checks on model inputs, shared by the three frameworks so that bad input gets the same clear error everywhere.

Frameworks differ in how they fail on bad indices: PyTorch raises deep inside an embedding kernel, JAX and XLA
clamp silently. So every implementation calls `validate_inputs` on concrete (host) values before computing; inside
a compiled decode step, where values are symbolic, the checks are skipped (the decode loop feeds only ids the model
itself produced).
"""

from __future__ import annotations

import numpy as np

from opt_core.config import OPTConfig
from opt_core.errors import InputError


def validate_inputs(
    config: OPTConfig,
    input_ids: np.ndarray | None,
    attention_mask: np.ndarray | None,
    position_ids: np.ndarray | None,
    past_length: int,
    batch_and_length: tuple[int, int],
) -> None:
    """Raises InputError naming the argument and the bad value (token id, length, shape, dtype, mask value),
    before any compute. Arrays are host numpy arrays.

    Args:
        input_ids: B T token ids, or None when the caller passes embeddings.
        attention_mask: B (past_length + T), 1 for real tokens and 0 for padding, or None.
        position_ids: B T explicit positions, or None.
        past_length: positions already in the cache.
        batch_and_length: (B, T) of the new tokens.
    """
    if input_ids is not None:
        _check_token_ids(config, input_ids)
    _check_not_empty(input_ids, batch_and_length)
    batch, length = batch_and_length
    mask_shape = None if attention_mask is None else attention_mask.shape
    position_shape = None if position_ids is None else position_ids.shape
    check_shapes(mask_shape, position_shape, past_length, batch_and_length)
    if attention_mask is not None:
        _check_attention_mask(attention_mask)
    source = "input_ids" if input_ids is not None else "inputs_embeds"
    if position_ids is not None:
        _check_position_ids(position_ids)
        source, last = "position_ids", int(position_ids.max(initial=-1))
    elif attention_mask is not None:
        last = int(attention_mask.sum(axis=1).max(initial=0)) - 1
    else:
        last = past_length + length - 1
    if last >= config.max_position_embeddings:
        raise InputError(
            f"{source}: the sequence needs position {last}, but the model has max_position_embeddings="
            f"{config.max_position_embeddings}: inputs (cache included) may be at most "
            f"{config.max_position_embeddings} tokens long"
        )


def check_shapes(mask_shape, position_shape, past_length: int, batch_and_length: tuple[int, int]) -> None:
    """The shape checks alone, for where values are symbolic (inside a jit shapes are still static).

    Args:
        mask_shape, position_shape: the attention mask's and position_ids' shapes, or None.
        past_length: positions already in the cache (0 without one); the mask covers them and the new tokens.
        batch_and_length: (B, T) of the new tokens.
    """
    batch, length = batch_and_length
    want = (batch, past_length + length)
    if mask_shape is not None and tuple(mask_shape) != want:
        raise InputError(
            f"attention_mask has shape {tuple(mask_shape)}, but {length} new tokens in a batch "
            f"of {batch} after {past_length} cached positions need shape {want}"
        )
    if position_shape is not None and tuple(position_shape) != (batch, length):
        raise InputError(f"position_ids has shape {tuple(position_shape)}, expected {(batch, length)} like input_ids")


def _check_token_ids(config: OPTConfig, input_ids: np.ndarray) -> None:
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be B T token ids (or one row of T), got shape {tuple(input_ids.shape)}")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise InputError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if input_ids.size == 0:
        return
    bad = (input_ids < 0) | (input_ids >= config.vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"input_ids: token id {int(input_ids[where])} at position {where} is out of range: the model's "
            f"vocab_size is {config.vocab_size} (ids must be in [0, {config.vocab_size}))"
        )


def _check_not_empty(input_ids: np.ndarray | None, batch_and_length: tuple[int, int]) -> None:
    """An empty batch or a row of no tokens has nothing to compute (frameworks fail on it in their own ways)."""
    batch, length = batch_and_length
    if batch == 0 or length == 0:
        name, shape = ("input_ids", input_ids.shape) if input_ids is not None else ("inputs_embeds", batch_and_length)
        what = "the batch is empty" if batch == 0 else "its rows hold no tokens"
        raise InputError(f"{name} has shape {tuple(shape)}: {what}")


def _check_attention_mask(attention_mask: np.ndarray) -> None:
    """1 for real tokens and 0 for padding, as integers, bools or floats (HF accepts each)."""
    if attention_mask.dtype.kind not in "biuf":
        raise InputError(
            f"attention_mask must hold 0 (padding) and 1 (real token) as integers, bools or floats, got dtype "
            f"{attention_mask.dtype}"
        )
    bad = ~np.isin(attention_mask, (0, 1))  # nan included
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"attention_mask must hold only 0 (padding) and 1 (real token), got {attention_mask[where].item()!r} "
            f"at position {where}"
        )


def _check_position_ids(position_ids: np.ndarray) -> None:
    if position_ids.dtype.kind not in "iu":
        raise InputError(f"position_ids must be integers, got dtype {position_ids.dtype}")
    if int(position_ids.min(initial=0)) < -2:
        raise InputError(f"position_ids must be >= -2 (OPT looks positions up at +2), got {position_ids.min()}")


def check_ids_or_embeds(input_ids, inputs_embeds) -> None:
    """Exactly one of the two, as HF's forward requires; InputError naming what was passed otherwise."""
    if input_ids is not None and inputs_embeds is not None:
        raise InputError("got both input_ids and inputs_embeds: pass exactly one of input_ids and inputs_embeds")
    if input_ids is None and inputs_embeds is None:
        raise InputError("got neither input_ids nor inputs_embeds: pass exactly one of input_ids and inputs_embeds")


def check_numeric(**arrays) -> None:
    """Raises InputError naming an argument that holds strings or objects: frameworks fail on those with errors of
    their own before any of this module's checks could run (JAX in `module.apply`)."""
    for name, value in arrays.items():
        if value is None:
            continue
        dtype = getattr(value, "dtype", None)  # a tracer has one; a list does not
        dtype = np.dtype(dtype) if dtype is not None else np.asarray(value).dtype
        if dtype.kind in "USO":
            raise InputError(f"{name} must hold numbers, got dtype {dtype}")


def check_cache_position(cache_position: np.ndarray, length: int) -> None:
    """The slots of `length` new tokens in a static cache: (length,) integers >= 0, as HF's `cache_position`."""
    if cache_position.dtype.kind not in "iu":
        raise InputError(f"cache_position must be integers, got dtype {cache_position.dtype}")
    if cache_position.shape != (length,):
        raise InputError(
            f"cache_position has shape {cache_position.shape}, but {length} new tokens need shape ({length},)"
        )
    if cache_position.size and int(cache_position.min()) < 0:
        raise InputError(f"cache_position starts at {int(cache_position.min())}: cache slots must be >= 0")


def check_static_cache(
    cache_batch: int, cache_length: int, past_length: int | None, batch_and_length: tuple[int, int], mask_shape
) -> None:
    """Checks new tokens against a static cache of `cache_batch` rows and `cache_length` slots.

    With a static cache the attention mask covers every slot (zeros past the tokens so far), as HF Flax's.

    Args:
        past_length: slots already used (None inside a compiled step, where the index is symbolic).
        batch_and_length: (B, T) of the new tokens.
        mask_shape: the attention mask's shape, or None.
    """
    batch, length = batch_and_length
    if past_length is not None and past_length < 0:
        raise InputError(f"cache_position starts at {past_length}: the new tokens' cache slots must be >= 0")
    if cache_batch != batch:
        raise InputError(f"the cache was made for a batch of {cache_batch}, the inputs have a batch of {batch}")
    if past_length is not None and past_length + length > cache_length:
        raise InputError(
            f"the cache holds {cache_length} positions, {past_length} are used: it has no room for {length} more "
            "tokens; make it longer with init_cache(batch_size, max_length)"
        )
    want = (batch, cache_length)
    if mask_shape is not None and tuple(mask_shape) != want:
        raise InputError(
            f"attention_mask has shape {tuple(mask_shape)}, but a batch of {batch} and a cache of {cache_length} "
            f"positions need shape {want}"
        )
