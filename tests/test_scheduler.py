"""The step scheduler's rules, the KV slot store's accounting, and the batched forward's mask."""

from __future__ import annotations

import pytest
import torch

from omni.engine.batched_forward import attention_mask
from omni.engine.buffers import GrowingTensor
from omni.engine.kv_memory import KVFull, KVSlots
from omni.engine.scheduler import Demand, StepScheduler


def test_decodes_first_then_prefill_chunks_under_the_budget():
    s = StepScheduler(token_budget=10, max_rows=8)
    plan = s.plan([Demand("a", 300), Demand("b", 1, decode=True), Demand("c", 2, decode=True)])
    assert sorted(plan[:2]) == [("b", 1), ("c", 2)]
    assert plan[2] == ("a", 7)  # the rest of the budget, not the whole 300-token clip
    assert sum(n for _, n in plan) == 10


def test_urgent_prefill_before_background_prefill():
    s = StepScheduler(token_budget=8, max_rows=8)
    plan = s.plan([Demand("bg", 100), Demand("reply-waits", 100, urgent=True)])
    assert plan == [("reply-waits", 8)]


def test_prefill_sessions_take_turns():
    s = StepScheduler(token_budget=4, max_rows=8)
    firsts = {s.plan([Demand("a", 100), Demand("b", 100)])[0][0] for _ in range(4)}
    assert firsts == {"a", "b"}


def test_max_rows_bounds_the_batch_and_one_row_turns_batching_off():
    s = StepScheduler(token_budget=100, max_rows=2)
    assert len(s.plan([Demand(k, 1, decode=True) for k in "abcd"])) == 2
    one = StepScheduler(token_budget=100, max_rows=1)
    seen = set()
    for _ in range(4):
        plan = one.plan([Demand("a", 1, decode=True), Demand("b", 50), Demand("c", 1, decode=True)])
        assert len(plan) == 1
        seen.add(plan[0][0])
    assert seen == {"a", "b", "c"}  # every session in turn, prefill too


def test_nothing_ready_plans_nothing():
    assert StepScheduler(8, 4).plan([Demand("a", 0)]) == []
    with pytest.raises(ValueError):
        StepScheduler(1, 4)


def test_kv_slots_admission_and_accounting():
    kv = KVSlots(layers=2, kv_heads=2, head_dim=4, slots=2, max_len=10, device="cpu", dtype=torch.float32)
    a, b = kv.allocate(), kv.allocate()
    with pytest.raises(KVFull):
        kv.allocate()
    kv.lengths[a] = 6
    assert kv.room(a) == 4
    stats = kv.stats()
    assert stats["slots_used"] == 2 and stats["tokens_used"] == 6
    assert stats["bytes_used"] == 6 * kv.bytes_per_token == 6 * 2 * 2 * 2 * 4 * 4
    kv.crop(a, 3)
    assert kv.lengths[a] == 3
    kv.release(b)
    assert kv.allocate() == b and kv.lengths[b] == 0


def test_mask_sees_own_prefix_only():
    # row 0: 2 cached + 1 new; row 1: 0 cached + 3 new
    mask = attention_mask(starts=[2, 0], counts=[1, 3], width=3, kv_len=3)[:, 0]
    assert mask[0, 0].tolist() == [True, True, True]
    assert mask[0, 1].tolist() == [True, False, False]  # padding query: key 0 only
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_growing_tensor_appends_without_losing_rows():
    g = GrowingTensor((2,), torch.float32, capacity=1)
    for i in range(5):
        g.append(torch.full((1, 2), float(i)))
    assert g.view()[:, 0].tolist() == [0, 1, 2, 3, 4]
    g.truncate(2)
    g.append(torch.full((2, 2), 9.0))
    assert g.view()[:, 0].tolist() == [0, 1, 9, 9]
