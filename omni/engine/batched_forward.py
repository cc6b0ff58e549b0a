"""One forward of a transformers decoder stack for several sessions at once, over KV slots.

Each row of the batch is one session's new tokens this step: one token for a decode step,
up to the scheduler's budget for a chunk of prefill. Rows are right-padded to the longest;
each keeps its own TMRoPE positions (3, n), so the model's rope deltas are never used. The
stack is transformers' own module (Qwen2.5-Omni's thinker LLM or talker LM), called with:

- `cache`: a per-step object whose `update()` (called by every attention layer, after the
  rotary embedding) writes each row's new keys and values into its session's slot and
  returns the keys and values the rows attend to: the slots' prefixes up to the longest row;
- `attention_mask`: a ready boolean mask per layer type, so transformers builds none: row b's
  query j sees its slot's keys up to its own absolute position, never another row's keys and
  never padding. Padding queries see key 0 only (their outputs are dropped), so no row of
  the softmax is empty.

With SDPA this is exactly the attention of one session alone (same keys, same positions, the
masked keys get zero weight); only the matmul shapes differ, so results match the unbatched
forward to float rounding (tests/test_batching.py states the tolerance).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from omni.engine.kv_memory import KVFull, KVSlots


@dataclass
class Row:
    slot: int
    embeds: torch.Tensor  # (n, E): the stack's input embeddings for this row's new tokens
    positions: torch.Tensor  # (3, n) TMRoPE positions


class _StepCache:
    """The slots of this step's rows, seen through the `Cache.update` call attention makes."""

    def __init__(self, kv: KVSlots, rows: list[Row], kv_len: int) -> None:
        self.kv = kv
        self.slots = [row.slot for row in rows]
        self.starts = [kv.lengths[row.slot] for row in rows]
        self.counts = [row.embeds.shape[0] for row in rows]
        self.kv_len = kv_len
        self._index = torch.tensor(self.slots, device=kv.keys.device)
        self._single = len(rows) == 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        for b, (slot, start, n) in enumerate(zip(self.slots, self.starts, self.counts)):
            keys[slot, :, start : start + n] = key_states[b, :, :n]
            values[slot, :, start : start + n] = value_states[b, :, :n]
        if self._single:  # one row: attend to its slot in place, no copy
            slot = self.slots[0]
            return keys[slot : slot + 1, :, : self.kv_len], values[slot : slot + 1, :, : self.kv_len]
        # slice the sequence first: only the rows' prefixes are gathered, not the whole slots
        k = keys[:, :, : self.kv_len].index_select(0, self._index)
        v = values[:, :, : self.kv_len].index_select(0, self._index)
        # a shorter row's gathered tail is never-written memory: masked, but a NaN there
        # would still poison the softmax (NaN * 0), so it is zeroed
        for b, (start, n) in enumerate(zip(self.starts, self.counts)):
            if start + n < self.kv_len:
                k[b, :, start + n :] = 0
                v[b, :, start + n :] = 0
        return k, v


class BatchedForward:
    """Runs `stack` (a transformers decoder taking inputs_embeds) on rows over `kv`."""

    def __init__(self, stack: torch.nn.Module, kv: KVSlots) -> None:
        self.stack = stack
        self.kv = kv
        config = stack.config
        self.layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if self.layer_types != {"full_attention"}:
            raise ValueError(f"sliding-window layers are not supported: {sorted(self.layer_types)}")
        # transformers 5.24 renamed the forward's `past_key_values` to `cache`
        params = inspect.signature(stack.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = kv.keys.device

    def __call__(self, rows: list[Row]) -> list[torch.Tensor]:
        """Run the rows; returns each row's last hidden states (n, H) and grows its slot by n."""
        kv = self.kv
        counts = [row.embeds.shape[0] for row in rows]
        starts = [kv.lengths[row.slot] for row in rows]
        for row, start, n in zip(rows, starts, counts):
            if start + n > kv.max_len:
                raise KVFull(f"the context is full ({kv.max_len} tokens)")
        width = max(counts)
        kv_len = max(s + n for s, n in zip(starts, counts))
        dim = rows[0].embeds.shape[1]
        embeds = torch.zeros(len(rows), width, dim, device=self.device, dtype=rows[0].embeds.dtype)
        positions = torch.zeros(3, len(rows), width, dtype=torch.long)
        for b, (row, n) in enumerate(zip(rows, counts)):
            embeds[b, :n] = row.embeds
            positions[:, b, :n] = row.positions
        mask = attention_mask(starts, counts, width, kv_len).to(self.device)
        cache = _StepCache(kv, rows, kv_len)
        out = self.stack(
            inputs_embeds=embeds,
            position_ids=positions.to(self.device),
            attention_mask={t: mask for t in self.layer_types},
            use_cache=False,
            **{self._cache_kw: cache},
        )
        for row, start, n in zip(rows, starts, counts):
            kv.lengths[row.slot] = start + n
        hidden = out.last_hidden_state
        return [hidden[b, :n] for b, n in enumerate(counts)]


def attention_mask(starts: list[int], counts: list[int], width: int, kv_len: int) -> torch.Tensor:
    """(B, 1, width, kv_len) bool: row b's query j (at absolute start_b + j) sees keys <= it."""
    key = torch.arange(kv_len).view(1, 1, -1)
    query = torch.tensor(starts).view(-1, 1) + torch.arange(width).view(1, -1)
    mask = key <= query[..., None]
    padding = torch.arange(width).view(1, -1) >= torch.tensor(counts).view(-1, 1)
    mask[padding] = key[0, 0] == 0
    return mask[:, None]
