"""Bucketing and padding of batched decode steps (omni/engine/cuda_graphs.py).

The step function here is a real static-shape decode step over a slot-indexed KV cache: it
writes each row's key/value at its position in its slot, attends over the first `length`
entries of that slot, and projects. The CPU tests run DecodeGraphs' eager path, which pads
exactly as the graph path does; the CUDA test (skipped without a GPU) checks graph replay
equals the eager result.
"""

from __future__ import annotations

import pytest
import torch

from omni.engine.cuda_graphs import (
    DecodeBatch,
    DecodeGraphs,
    bucket_for,
    bucket_sizes,
    pad_batch,
)

EMBED = 8
SLOTS = 6  # slot SLOTS (the last) is the padding scratch slot
MAX_LEN = 12


class SlotAttentionStep:
    """One decode step of single-head attention over a slot-indexed KV cache."""

    def __init__(self, device: str = "cpu") -> None:
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(EMBED, EMBED, generator=gen).to(device)
        self.pos_scale = torch.randn(EMBED, generator=gen).to(device)
        self.cache = torch.zeros(SLOTS + 1, MAX_LEN, EMBED, device=device)
        self.seen_rows: list[int] = []

    def __call__(self, embeds, positions, slots, lengths) -> torch.Tensor:
        self.seen_rows.append(embeds.shape[0])
        x = embeds[:, 0] + positions[0, :, 0, None].float() * self.pos_scale
        self.cache[slots, lengths - 1] = x
        keys = self.cache[slots]  # (B, MAX_LEN, E)
        scores = torch.einsum("be,bte->bt", x, keys)
        visible = torch.arange(MAX_LEN, device=x.device)[None, :] < lengths[:, None]
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return torch.einsum("bt,bte->be", weights, keys) @ self.proj


def decode_batch(rows: int, seed: int, device: str = "cpu") -> DecodeBatch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, MAX_LEN + 1, (rows,), generator=gen)
    return DecodeBatch(
        inputs_embeds=torch.randn(rows, 1, EMBED, generator=gen).to(device),
        position_ids=(lengths - 1).expand(3, rows)[..., None].clone().to(device),
        slots=torch.randperm(SLOTS, generator=gen)[:rows].to(device),
        lengths=lengths.to(device),
    )


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_bucket_for_picks_the_smallest_that_fits():
    buckets = bucket_sizes(40)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 16, 17, 25, 40)] == [
        1, 2, 4, 8, 8, 16, 16, 24, 32, 40,
    ]
    for bad in (0, 41):
        with pytest.raises(ValueError):
            bucket_for(bad, buckets)


def test_padding_rows_are_inert_and_real_rows_unchanged():
    batch = decode_batch(3, seed=1)
    padded = pad_batch(batch, 8, pad_slot=SLOTS)
    assert padded.inputs_embeds.shape == (8, 1, EMBED)
    assert padded.position_ids.shape == (3, 8, 1)
    assert padded.slots.shape == padded.lengths.shape == (8,)
    assert torch.equal(padded.inputs_embeds[:3], batch.inputs_embeds)
    assert torch.equal(padded.position_ids[:, :3], batch.position_ids)
    assert torch.equal(padded.slots[:3], batch.slots)
    assert torch.equal(padded.lengths[:3], batch.lengths)
    assert not padded.inputs_embeds[3:].any() and not padded.position_ids[:, 3:].any()
    assert padded.slots[3:].tolist() == [SLOTS] * 5
    assert padded.lengths[3:].tolist() == [1] * 5
    assert padded.inputs_embeds.dtype == batch.inputs_embeds.dtype
    assert pad_batch(batch, 3, SLOTS) is batch
    with pytest.raises(ValueError):
        pad_batch(batch, 2, SLOTS)


@pytest.mark.parametrize("rows", [1, 3, 5, 6])
def test_eager_path_equals_the_unpadded_step(rows):
    batch = decode_batch(rows, seed=rows)
    unpadded = SlotAttentionStep()
    expected = unpadded(*batch.tensors())

    step = SlotAttentionStep()
    graphs = DecodeGraphs(step, max_batch=8, pad_slot=SLOTS, device="cpu")
    out = graphs(batch)

    bucket = bucket_for(rows, graphs.buckets)
    assert step.seen_rows == [bucket]  # the step saw the padded batch
    assert out.shape == (rows, EMBED)  # the padded rows' outputs are dropped
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # padding wrote only to the scratch slot: every session's slot is as the unpadded run left it
    torch.testing.assert_close(step.cache[:SLOTS], unpadded.cache[:SLOTS], rtol=0, atol=0)
    assert torch.isfinite(out).all()


def test_tuple_outputs_are_cut_row_wise():
    def step(embeds, positions, slots, lengths):
        return embeds[:, 0] * 2, lengths + 1

    graphs = DecodeGraphs(step, max_batch=4, pad_slot=SLOTS, device="cpu")
    batch = decode_batch(3, seed=7)
    doubled, next_lengths = graphs(batch)
    assert torch.equal(doubled, batch.inputs_embeds[:, 0] * 2)
    assert torch.equal(next_lengths, batch.lengths + 1)


def test_graphs_need_cuda():
    with pytest.raises(ValueError):
        DecodeGraphs(SlotAttentionStep(), 4, pad_slot=SLOTS, device="cpu", use_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_equals_eager_on_cuda():
    eager_step, graph_step = SlotAttentionStep("cuda"), SlotAttentionStep("cuda")
    eager = DecodeGraphs(eager_step, max_batch=6, pad_slot=SLOTS, device="cuda", use_graphs=False)
    graphs = DecodeGraphs(graph_step, max_batch=6, pad_slot=SLOTS, device="cuda")
    graphs.capture_all(EMBED, torch.float32)
    for seed, rows in enumerate((1, 3, 6, 3, 2)):  # a bucket replayed again with new inputs
        batch = decode_batch(rows, seed=seed, device="cuda")
        torch.testing.assert_close(graphs(batch), eager(batch))
    torch.testing.assert_close(graph_step.cache[:SLOTS], eager_step.cache[:SLOTS])
