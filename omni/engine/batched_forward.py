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
forward to float rounding (tests/test_batching.py states the tolerance). With
`attn_implementation = "flash_attention_2"` the mask is a `VarlenLayout` instead and the rows
run packed, without padding (omni/engine/varlen_attention.py).

Decode-only steps (one token per row) can instead run as CUDA graphs (`cuda_graphs=True`,
omni/engine/cuda_graphs.py): the same forward with static shapes, a graph per bucket of
batch size and of key length (powers of two), the slots and lengths as tensors, so no Python
integer is baked into a captured graph. Padding rows write only to a scratch slot.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from omni.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from omni.engine.kv_memory import KVFull, KVSlots
from omni.engine.varlen_attention import VarlenLayout, is_varlen

log = logging.getLogger(__name__)

MIN_KEY_BUCKET = 256  # decode graphs attend over 256, 512, 1024, ... keys


@dataclass
class Row:
    slot: int
    embeds: torch.Tensor  # (n, E): the stack's input embeddings for this row's new tokens
    positions: torch.Tensor  # (3, n) TMRoPE positions
    # Qwen3-Omni's vision features for its first layers: (layers, m, E) for the m of the n
    # rows that `deepstack_rows` (n,) bool marks
    deepstack: torch.Tensor | None = None
    deepstack_rows: torch.Tensor | None = None


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


class _DecodeCache:
    """Decode writes with tensor indices and a fixed key length (capturable in a CUDA graph)."""

    def __init__(self, kv: KVSlots, slots: torch.Tensor, lengths: torch.Tensor, kv_len: int) -> None:
        self.kv = kv
        self.slots = slots
        self.write_at = lengths - 1
        self.kv_len = kv_len
        self.valid = torch.arange(kv_len, device=slots.device)[None, :] < lengths[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        keys[self.slots, :, self.write_at] = key_states[:, :, 0]
        values[self.slots, :, self.write_at] = value_states[:, :, 0]
        k = keys[:, :, : self.kv_len].index_select(0, self.slots)
        v = values[:, :, : self.kv_len].index_select(0, self.slots)
        keep = self.valid[:, None, :, None]  # never-written memory is zeroed (NaN * 0)
        return k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)


class BatchedForward:
    """Runs `stack` (a transformers decoder taking inputs_embeds) on rows over `kv`."""

    def __init__(
        self,
        stack: torch.nn.Module,
        kv: KVSlots,
        max_batch: int = 16,
        cuda_graphs: bool = False,
        keep_layer: int | None = None,
    ) -> None:
        """`keep_layer` k: each call also keeps every row's states after decoder layer k
        (transformers' `hidden_states[k]`) in `kept` (Qwen3-Omni's talker reads them)."""
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
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        if cuda_graphs and kv.scratch_slot is None:
            raise ValueError("decode graphs need a KV store with a scratch slot for padding rows")
        self._graphs: dict[int, DecodeGraphs] = {}  # per key-length bucket
        self.packed = is_varlen(config)  # flash_attention_2: rows packed, no padded mask
        # per row (n, H), from the last call; None: not kept (no keep_layer, or a decode graph,
        # whose replay runs no Python hook: decode rows are reply tokens, text)
        self.kept: list[torch.Tensor] | None = None
        self._layer_out: torch.Tensor | None = None
        if keep_layer is not None:
            stack.layers[keep_layer - 1].register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        self._layer_out = output[0] if isinstance(output, tuple) else output

    def __call__(self, rows: list[Row]) -> list[torch.Tensor]:
        """Run the rows; returns each row's last hidden states (n, H) and grows its slot by n."""
        kv = self.kv
        counts = [row.embeds.shape[0] for row in rows]
        starts = [kv.lengths[row.slot] for row in rows]
        for row, start, n in zip(rows, starts, counts):
            if start + n > kv.max_len:
                raise KVFull(f"the context is full ({kv.max_len} tokens)")
        self.kept, self._layer_out = None, None
        if self.cuda_graphs and max(counts) == 1:
            return self._decode(rows, starts)
        width = max(counts)
        kv_len = max(s + n for s, n in zip(starts, counts))
        dim = rows[0].embeds.shape[1]
        embeds = torch.zeros(len(rows), width, dim, device=self.device, dtype=rows[0].embeds.dtype)
        positions = torch.zeros(3, len(rows), width, dtype=torch.long)
        for b, (row, n) in enumerate(zip(rows, counts)):
            embeds[b, :n] = row.embeds
            positions[:, b, :n] = row.positions
        if self.packed:
            mask = VarlenLayout.build(starts, counts, width, kv_len, self.device)
        else:
            mask = attention_mask(starts, counts, width, kv_len).to(self.device)
        cache = _StepCache(kv, rows, kv_len)
        out = self.stack(
            inputs_embeds=embeds,
            position_ids=positions.to(self.device),
            attention_mask=self._masks(mask),
            use_cache=False,
            **{self._cache_kw: cache},
            **_deepstack(rows, width),
        )
        for row, start, n in zip(rows, starts, counts):
            kv.lengths[row.slot] = start + n
        hidden = out.last_hidden_state
        if self._layer_out is not None:
            self.kept = [self._layer_out[b, :n] for b, n in enumerate(counts)]
        return [hidden[b, :n] for b, n in enumerate(counts)]

    def _masks(self, mask: torch.Tensor | VarlenLayout) -> torch.Tensor | dict:
        """The forward's `attention_mask`: a ready 4-D mask passes through transformers'
        `create_causal_mask` as it is (Qwen3-Omni's text models call it directly, without the
        per-layer-type dict Qwen2.5-Omni's accept); a varlen layout goes as that dict."""
        if isinstance(mask, VarlenLayout):
            return {t: mask for t in self.layer_types}
        return mask

    def decode_static(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        lengths: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        """One token per row with static shapes: embeds (B, 1, E), positions (3, B, 1), slots
        and lengths (B,) tensors (lengths count this step's token); returns hidden (B, 1, H).
        Does not touch `kv.lengths` (Python state stays out of a captured graph)."""
        mask = (torch.arange(kv_len, device=slots.device)[None, :] < lengths[:, None])[:, None, None]
        out = self.stack(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=self._masks(mask),
            use_cache=False,
            **{self._cache_kw: _DecodeCache(self.kv, slots, lengths, kv_len)},
        )
        return out.last_hidden_state

    def _decode(self, rows: list[Row], starts: list[int]) -> list[torch.Tensor]:
        kv = self.kv
        kv_len = key_bucket(max(starts) + 1, kv.max_len)
        graphs = self._graphs.get(kv_len)
        if graphs is None:
            step = lambda e, p, s, n: self.decode_static(e, p, s, n, kv_len)  # noqa: E731
            graphs = self._graphs[kv_len] = DecodeGraphs(
                step, self.max_batch, kv.scratch_slot, self.device, use_graphs=self.device.type == "cuda"
            )
        batch = DecodeBatch(
            inputs_embeds=torch.stack([row.embeds for row in rows]),
            position_ids=torch.stack([row.positions for row in rows], dim=1).to(self.device),
            slots=torch.tensor([row.slot for row in rows], device=self.device),
            lengths=torch.tensor([s + 1 for s in starts], device=self.device),
        )
        try:
            hidden = graphs(batch)
        except Exception:  # a model this stack can't capture: run every step eagerly
            log.exception("decode graph capture failed; decoding without CUDA graphs")
            self.cuda_graphs = False
            return self(rows)
        for row, start in zip(rows, starts):
            kv.lengths[row.slot] = start + 1
        return [hidden[b] for b in range(len(rows))]


def _deepstack(rows: list[Row], width: int) -> dict:
    """The stack's deepstack arguments (Qwen3-Omni's text model adds each layer's features at
    the visual positions, in row-major order): none when no row has any."""
    if all(row.deepstack is None for row in rows):
        return {}
    device = rows[0].embeds.device
    where = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    features: list[torch.Tensor] = []
    for b, row in enumerate(rows):
        if row.deepstack is not None:
            visual = row.deepstack_rows.to(device)
            where[b, : visual.shape[0]] = visual
            features.append(row.deepstack)
    return {
        "visual_pos_masks": where,
        "deepstack_visual_embeds": list(torch.cat(features, dim=1)),
    }


def key_bucket(n: int, max_len: int) -> int:
    """The key length a decode graph attends over: the power of two >= n (at least 256)."""
    size = MIN_KEY_BUCKET
    while size < n:
        size *= 2
    return min(size, max_len)


def attention_mask(starts: list[int], counts: list[int], width: int, kv_len: int) -> torch.Tensor:
    """(B, 1, width, kv_len) bool: row b's query j (at absolute start_b + j) sees keys <= it."""
    key = torch.arange(kv_len).view(1, 1, -1)
    query = torch.tensor(starts).view(-1, 1) + torch.arange(width).view(1, -1)
    mask = key <= query[..., None]
    padding = torch.arange(width).view(1, -1) >= torch.tensor(counts).view(-1, 1)
    mask[padding] = key[0, 0] == 0
    return mask[:, None]
