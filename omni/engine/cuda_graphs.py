"""CUDA graphs for batched decode steps, one per bucketed batch size.

A decode step's launch overhead (hundreds of small kernels per layer stack) dominates at small
batch sizes; a CUDA graph replays the whole step as one launch. A graph has fixed shapes, so a
batch of n rows runs in the smallest bucket >= n, padded with inert rows: zero embeddings at
position 0, writing only to a scratch KV slot that no session owns (`pad_slot`), each seeing
just itself (length 1, so its attention is finite). The padded rows' outputs are dropped.

On CUDA, `DecodeGraphs` captures one graph per bucket around a static-shape step function
(warmed up on a side stream, static input and output buffers, replayed after the inputs are
copied in). Elsewhere it calls the function eagerly through the same padding, so CPU tests
cover the shapes and the padding that the graphs see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# buckets below 16 double; above, steps of 8 keep the padding waste under a third
SMALL_BUCKETS = (1, 2, 4, 8, 16)
LARGE_BUCKET_STEP = 8
WARMUP_STEPS = 3  # eager runs on a side stream before capture (lazy inits, cuBLAS workspaces)

StepOutput = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class DecodeBatch:
    """One decode step's inputs for B rows (one new token per session)."""

    inputs_embeds: torch.Tensor  # (B, 1, E)
    position_ids: torch.Tensor  # (3, B, 1): TMRoPE temporal, height, width
    slots: torch.Tensor  # (B,) long: the KV slot of each row's session
    lengths: torch.Tensor  # (B,) long: tokens in the row's KV slot, this step's one included

    @property
    def rows(self) -> int:
        return self.inputs_embeds.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs_embeds, self.position_ids, self.slots, self.lengths


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], StepOutput]


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, then every 8 up to max_batch; max_batch itself is always the last."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = [s for s in SMALL_BUCKETS if s < max_batch]
    size = SMALL_BUCKETS[-1] + LARGE_BUCKET_STEP
    while size < max_batch:
        sizes.append(size)
        size += LARGE_BUCKET_STEP
    return [*sizes, max_batch]


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `rows`."""
    if rows < 1:
        raise ValueError(f"a decode batch has at least one row, got {rows}")
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket ({buckets[-1]})")


def pad_batch(batch: DecodeBatch, size: int, pad_slot: int) -> DecodeBatch:
    """`batch` with inert rows appended up to `size` rows (the real rows come first)."""
    extra = size - batch.rows
    if extra < 0:
        raise ValueError(f"cannot pad {batch.rows} rows down to {size}")
    if extra == 0:
        return batch
    embeds, positions, slots, lengths = batch.tensors()
    return DecodeBatch(
        inputs_embeds=torch.cat([embeds, embeds.new_zeros(extra, *embeds.shape[1:])]),
        position_ids=torch.cat([positions, positions.new_zeros(3, extra, 1)], dim=1),
        slots=torch.cat([slots, slots.new_full((extra,), pad_slot)]),
        lengths=torch.cat([lengths, lengths.new_ones(extra)]),
    )


def _first_rows(output: StepOutput, rows: int) -> StepOutput:
    if isinstance(output, tuple):
        return tuple(t[:rows] for t in output)
    return output[:rows]


def _clone(output: StepOutput) -> StepOutput:
    if isinstance(output, tuple):
        return tuple(t.clone() for t in output)
    return output.clone()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: DecodeBatch  # the static buffers the graph reads
    output: StepOutput  # the static buffers it writes


class DecodeGraphs:
    """Runs `step` on a decode batch padded to its bucket: graph replay on CUDA, eager elsewhere.

    `step` must take (inputs_embeds, position_ids, slots, lengths) of one fixed batch size and
    return a tensor (or tuple of tensors) with the batch first; on CUDA it must be capturable
    (no host syncs, no shape-dependent Python branches). Its side effects on the KV cache for
    padding rows land in `pad_slot` only.
    """

    def __init__(
        self,
        step: StepFn,
        max_batch: int,
        pad_slot: int,
        device: torch.device | str,
        use_graphs: bool | None = None,
    ) -> None:
        self.step = step
        self.buckets = bucket_sizes(max_batch)
        self.pad_slot = pad_slot
        self.device = torch.device(device)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._graphs: dict[int, _Graph] = {}
        self._pool = None  # one memory pool shared by every bucket's graph

    def __call__(self, batch: DecodeBatch) -> StepOutput:
        size = bucket_for(batch.rows, self.buckets)
        padded = pad_batch(batch, size, self.pad_slot)
        if not self.use_graphs:
            return _first_rows(self.step(*padded.tensors()), batch.rows)
        graph = self._graphs.get(size) or self._capture(padded)
        for static, given in zip(graph.inputs.tensors(), padded.tensors()):
            static.copy_(given)
        graph.graph.replay()
        # a copy: the next replay overwrites the static output
        return _clone(_first_rows(graph.output, batch.rows))

    def capture_all(self, embed_dim: int, dtype: torch.dtype) -> None:
        """Capture every bucket ahead of serving, largest first (later ones reuse its pool)."""
        for size in reversed(self.buckets):
            if size not in self._graphs:
                self._capture(self._padding_batch(size, embed_dim, dtype))

    def _padding_batch(self, size: int, embed_dim: int, dtype: torch.dtype) -> DecodeBatch:
        empty = DecodeBatch(
            inputs_embeds=torch.zeros(0, 1, embed_dim, dtype=dtype, device=self.device),
            position_ids=torch.zeros(3, 0, 1, dtype=torch.long, device=self.device),
            slots=torch.zeros(0, dtype=torch.long, device=self.device),
            lengths=torch.zeros(0, dtype=torch.long, device=self.device),
        )
        return pad_batch(empty, size, self.pad_slot)

    def _capture(self, example: DecodeBatch) -> _Graph:
        size = example.rows
        # capture on padding rows only, so warmup and capture touch no session's KV slot
        embeds = example.inputs_embeds
        static = self._padding_batch(size, embeds.shape[-1], embeds.dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(*static.tensors())
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.step(*static.tensors())
        captured = self._graphs[size] = _Graph(graph, static, output)
        return captured
