"""KV memory: one preallocated key/value store per model stage, one fixed slot per session.

Why slots and not pages. A call lives for minutes and its context is bounded by the
session's budget (`max_context_tokens`), so reserving that budget when the call is admitted
costs nothing a paged cache would save for long: admission is a count of free slots, a reply
can never run out of memory halfway, and no block tables are needed. A slot index is exactly
what flash-attention's `flash_attn_with_kvcache(cache_batch_idx=...)` takes. Paging would win
where contexts differ widely in length (reserved but unused memory); the store is allocated
with `torch.empty`, so on the CPU untouched pages are never resident, and on a GPU the
settings size it (`kv_slots` x `max_context_tokens`).

Layout (layers, slots, kv_heads, max_len, head_dim): a slot's keys for one head are
contiguous along the sequence, so writing new tokens and slicing a prefix are cheap.
Rotary positions are applied before keys are stored, so a slot's keys keep their positions
whatever happens around them: `evict` can drop ranges of a slot (old video, old audio) and
close the gap in place, and the keys that stay are still the keys of their positions.
"""

from __future__ import annotations

import torch

from omni.engine.buffers import clipped, kept_index


class KVFull(RuntimeError):
    """No free slot (too many sessions) or a slot's context is full."""


class KVSlots:
    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        slots: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        scratch_slot: bool = False,
    ) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError("the KV store needs at least one slot of at least one token")
        # a slot no session owns, for the padding rows of CUDA-graph decode batches
        self.scratch_slot = slots if scratch_slot else None
        shape = (layers, slots + scratch_slot, kv_heads, max_len, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * slots
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first

    @classmethod
    def for_model(
        cls,
        config,
        slots: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        scratch_slot: bool = False,
    ) -> KVSlots:
        """A store shaped for a decoder config (a thinker text config or the talker config)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            slots=slots,
            max_len=max_len,
            device=device,
            dtype=dtype,
            scratch_slot=scratch_slot,
        )

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def allocate(self) -> int:
        if not self._free:
            raise KVFull(f"all {self.slots} KV slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def crop(self, slot: int, length: int) -> None:
        self.lengths[slot] = min(self.lengths[slot], max(0, length))

    def evict(self, slot: int, ranges: list[tuple[int, int]]) -> int:
        """Drop the slot's entries in `ranges` ([start, end) each), moving the later ones down
        in place; returns how many went. One layer at a time, so the copy costs one layer's
        share of the slot, not the whole store's."""
        ranges = clipped(ranges, self.lengths[slot])
        if not ranges:
            return 0
        first, length = ranges[0][0], self.lengths[slot]
        keep = kept_index(ranges, length, self.keys.device)
        for store in (self.keys, self.values):
            for layer in store:  # (slots, heads, len, dim)
                layer[slot, :, first : first + keep.numel()] = layer[slot].index_select(1, keep)
        self.lengths[slot] = first + keep.numel()
        return length - self.lengths[slot]

    def room(self, slot: int) -> int:
        return self.max_len - self.lengths[slot]

    @property
    def bytes_per_token(self) -> int:
        layers, _, heads, _, dim = self.keys.shape
        return 2 * layers * heads * dim * self.keys.element_size()

    def stats(self) -> dict[str, int]:
        used = sum(self.lengths)
        return {
            "slots_total": self.slots,
            "slots_used": self.slots - len(self._free),
            "tokens_used": used,
            "bytes_used": used * self.bytes_per_token,
            "bytes_total": self.slots * self.max_len * self.bytes_per_token,
        }
