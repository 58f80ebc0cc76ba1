"""The server's step model for PyTorch: a static cache whose rows decode at their own positions.

Siblings: `opt_serve/tf_step.py`, `opt_serve/flax_step.py` (the same two calls in Keras and Flax); the scheduler
that drives them is `opt_serve.engine`.

Both calls go through the model's public decoder with an `opt_torch.cache.StaticKVCache`, as `generate` does:
* `prefill` is `opt_torch.generation.prefill` on a batch-of-one cache sized as `generate` sizes it (prompt + new
  tokens), so a prompt's first token comes from the very logits `generate` picks it from; its keys and values are
  then copied into the row.
* `decode` runs the rows up to the highest in use (eager torch has no shape to keep) and writes each row's new
  keys and values at that row's own position (`RowSlotCache.update`), passes the
  positions as `position_ids`, and lets the attention mask (each row: its slots 0 .. position) decide what every
  row sees. The shared `cache_position` is the last slot, so the causal part of the mask allows every slot.

Shapes: B rows (slots), N heads, S max length, H head dim, T0 prompt length, V vocab.
"""

from __future__ import annotations

import numpy as np
import torch

from opt_torch.cache import LayerCache, StaticKVCache
from opt_torch.generation import lm_logits, prepare_decoding
from opt_torch.generation import prefill as generate_prefill
from opt_torch.linear import packed_linears


class RowSlotCache(StaticKVCache):
    """A StaticKVCache whose decode step runs its first rows (B of them), writing row b's new keys and values at
    slot `write_slots[b]`."""

    def __init__(self, config, batch_size: int, max_length: int, dtype=torch.float32, device=None):
        super().__init__(config, batch_size, max_length, dtype, device)
        self.write_slots = torch.zeros(batch_size, dtype=torch.long, device=device)  # B

    def layer(self, layer_idx: int, cache_position: torch.Tensor) -> LayerCache:
        return LayerCache(self, layer_idx, cache_position)  # attention's writes go through `update` below

    def update(self, layer_idx: int, k, v, cache_position) -> tuple[torch.Tensor, torch.Tensor]:
        """B N 1 H new keys and values, one per row at its own slot; returns the first B rows' B N S H."""
        rows = torch.arange(k.shape[0], device=k.device)
        keys, values = self.keys[layer_idx][: k.shape[0]], self.values[layer_idx][: k.shape[0]]  # views
        keys[rows, :, self.write_slots] = k[:, :, 0]  # B N H
        values[rows, :, self.write_slots] = v[:, :, 0]
        return keys, values

    def put_row(self, slot: int, source: StaticKVCache, length: int) -> None:
        """Copies the first `length` slots of a batch-of-one cache into row `slot`."""
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            for layer, buffer in enumerate(theirs):
                mine[layer][slot, :, :length] = buffer[0, :, :length]


class TorchStepModel:
    """`opt_serve.engine.StepModel` for an `opt_torch.OPTForCausalLM`.

    Args:
        model: the loaded causal LM (any dtype, adapters and int8 included: its own modules run).
        slots: B, the rows decoded together.
        max_length: S, positions per row (prompt + completion).
    """

    def __init__(self, model, slots: int, max_length: int):
        self.model, self.slots, self.max_length = model.eval(), slots, max_length
        prepare_decoding(model)  # the LM head as generate computes it (opt_torch.generation)
        self.device = model.device
        self.cache = RowSlotCache(model.config, slots, max_length, model.dtype, self.device)
        self.last_slot = torch.tensor([max_length - 1], device=self.device)
        self.key_slots = torch.arange(max_length, device=self.device)

    @torch.no_grad()
    @packed_linears()  # as generate's loops compute
    def prefill(self, slot: int, prompt: np.ndarray, new_tokens: int, all_logits: bool) -> np.ndarray:
        length = min(len(prompt) + new_tokens, self.max_length)  # generate's cache size for this call
        ids = torch.from_numpy(prompt).to(self.device)[None]  # 1 T0
        mask = torch.zeros((1, length), dtype=torch.long, device=self.device)
        mask[:, : len(prompt)] = 1
        cache = StaticKVCache(self.model.config, 1, length, self.model.dtype, self.device)
        last, hidden = generate_prefill(self.model, ids, mask, cache)  # 1 V, 1 T0 E
        self.cache.put_row(slot, cache, len(prompt))
        if not all_logits:
            return last.cpu().numpy()
        logits = lm_logits(self.model, hidden[0])  # T0 V
        logits[-1] = last[0]
        return logits.cpu().numpy()

    @torch.no_grad()
    @packed_linears()
    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        positions = torch.from_numpy(positions).to(self.device)  # B
        self.cache.write_slots = positions
        mask = (self.key_slots[None, :] <= positions[:, None]).long()  # B S: each row's slots so far
        hidden = self.model.model.decoder(
            torch.from_numpy(tokens).to(self.device)[:, None],
            mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            cache_position=self.last_slot,
            validate=False,
        ).last_hidden_state[:, -1]
        return lm_logits(self.model, hidden).cpu().numpy()
