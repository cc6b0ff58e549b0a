"""The context budget (omni/engine/context_budget.py): the thinker's context stays within it
over a long call, the oldest content goes first by kind (video, then audio, then words),
never the instructions or the last exchanges, truncation "disabled" and retention_ratio do
what OpenAI's session.truncation says, the talker's context follows the thinker's, and
eviction is measured against recomputing the retained content. Real transformers modules on
the tiny checkpoint, in this process (the workers' side: tests/test_item_delete.py).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from engine_helpers import thinker_conversation
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.checkpoints.processor import load_processor
from omni.engine.api import AudioChunk, ReplyDone, ReplyOptions, SessionOptions, Truncation
from omni.engine.buffers import GrowingTensor
from omni.engine.context_budget import KEEP_LAST_EXCHANGES
from omni.engine.engine import EngineConfig, running_engine
from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.scheduler import StepScheduler
from omni.engine import thinker as thinker_module
from omni.engine.thinker import ThinkerConversation, ThinkerStage

SLOT_LEN = 2048


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    torch.set_grad_enabled(False)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return model.thinker, load_processor(tiny_checkpoint)


class Mirror:
    """The talker's view of the context: the rows the thinker sends, minus those it evicts."""

    def __init__(self) -> None:
        self.positions = GrowingTensor((3,), torch.long)
        self.rebuilds = 0  # rolled back to nothing: a recompute

    def rows(self, piece: ContextRows) -> None:
        if piece.rows.numel() == 0:
            self.rebuilds += piece.start == 0
            self.positions.truncate(piece.start)
        else:
            assert piece.start == len(self.positions)
            self.positions.append(piece.positions.T)

    def evict(self, ranges: list[tuple[int, int]]) -> None:
        self.positions.delete(ranges)


def make(tiny, kv: KVSlots, **options) -> tuple[ThinkerConversation, Mirror]:
    thinker, processor = tiny
    mirror = Mirror()
    conv = thinker_conversation(thinker, processor, mirror.rows, kv, on_evict=mirror.evict, **options)
    return conv, mirror


def speech(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(16_000 * seconds)) / 16_000
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.1 * noise * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)


def user_turn(conv: ThinkerConversation, n: int) -> None:
    """Camera frames with 2 s of speech (a video with audio), then typed words."""
    for k in range(4):
        conv.append_video_frame(frame(10 * n + k))
    conv.append_audio(speech(2.0, n))
    conv.add_text(f"turn {n}: what do you see and hear now?")


def reply(stage: ThinkerStage, convs: dict[str, ThinkerConversation], key: str, n: int = 3) -> list[int]:
    conv = convs[key]
    conv.end_turn()
    r = conv.start_reply(n, greedy=True, min_tokens=n)
    while not r.done:
        assert not stage.step(convs).over
        if conv.can_choose():
            conv.choose()
    return r.tokens


def kinds_left(conv: ThinkerConversation) -> dict[int, set[str]]:
    left: dict[int, set[str]] = {}
    for s in conv.ledger:
        left.setdefault(s.exchange, set()).add(s.kind)
    return left


def test_budget_holds_over_a_long_call_and_the_talker_follows(tiny) -> None:
    kv = KVSlots.for_model(tiny[0].config.text_config, 1, SLOT_LEN, "cpu", torch.float32)
    conv, mirror = make(tiny, kv, budget=1100)
    stage = ThinkerStage(tiny[0], kv, StepScheduler(128, 4))
    convs = {"s": conv}
    system = conv.ledger[0]
    replies = []
    for n in range(10):
        user_turn(conv, n)
        while conv.pending:
            assert not stage.step(convs).over
            # what the cache holds; rows still queued are made room for as they run
            assert conv.cached <= conv.budget
        replies.append(reply(stage, convs, "s"))
        assert len(replies[-1]) == 3
        assert conv.cached <= conv.budget + 3
        # the talker's rows are the thinker's context, position for position
        assert torch.equal(mirror.positions.view(), torch.cat([s.positions for s in conv.ledger], 1).T)
    left = kinds_left(conv)
    assert conv.ledger[0] is system and system.kind == "system"
    for e in range(conv.exchange - KEEP_LAST_EXCHANGES + 1, conv.exchange + 1):
        assert {"video", "audio", "text"} <= left[e]  # the last exchanges are whole
    # what is left of the older exchanges: their words; their frames and audio went first
    assert all(kinds == {"text"} for e, kinds in left.items() if 0 <= e < conv.exchange - 2)
    # the same call arriving all at once (a worker restart replays it): it runs, within budget
    kv.release(conv.slot)
    rebuilt, _ = make(tiny, kv, budget=1100)
    for n, tokens in enumerate(replies):
        user_turn(rebuilt, n)
        rebuilt.add_reply(tokens)
    stage.drain({"s": rebuilt})
    assert len(rebuilt.tokens) <= rebuilt.budget
    assert kinds_left(rebuilt)[conv.exchange] == left[conv.exchange]


def test_eviction_order_by_kind(tiny) -> None:
    kv = KVSlots.for_model(tiny[0].config.text_config, 1, SLOT_LEN, "cpu", torch.float32)
    conv, _ = make(tiny, kv)
    stage = ThinkerStage(tiny[0], kv, StepScheduler(256, 4))
    convs = {"s": conv}
    for n in range(4):
        user_turn(conv, n)
        reply(stage, convs, "s")
    video_0 = sum(s.size for s in conv.ledger if s.exchange == 0 and s.kind == "video")

    def squeeze(by: int) -> None:
        conv.budget = len(conv.tokens) - by
        conv.fit_budget(0)
        assert len(conv.tokens) <= conv.budget

    squeeze(1)  # one grid step of the oldest exchange's video
    assert kinds_left(conv)[0] == {"video", "audio", "text"}
    assert sum(s.size for s in conv.ledger if s.exchange == 0 and s.kind == "video") < video_0
    old = lambda kind: sum(s.size for s in conv.ledger if 0 <= s.exchange < 2 and s.kind == kind)  # noqa: E731
    squeeze(old("video") + 1)  # all old video, then the oldest audio chunk
    left = kinds_left(conv)
    assert "video" not in left[0] | left[1] and "audio" not in left[0] and "audio" in left[1]
    squeeze(old("audio") + 1)  # all old audio, then exchange 0's words, whole
    left = kinds_left(conv)
    assert 0 not in left and left[1] == {"text"} and left[-1] == {"system"}
    assert {"video", "audio", "text"} <= left[2] and {"video", "audio", "text"} <= left[3]
    # past what the older exchanges free, the one before the current goes, media first
    size = lambda exchange, kind: sum(  # noqa: E731
        s.size for s in conv.ledger if s.exchange == exchange and s.kind == kind
    )
    before_2 = {kind: size(2, kind) for kind in ("video", "audio", "text")}
    squeeze(old("text") + 1)  # exchange 1's words, then one grid step of exchange 2's video
    assert 1 not in kinds_left(conv)
    assert 0 < size(2, "video") < before_2["video"]
    assert (size(2, "audio"), size(2, "text")) == (before_2["audio"], before_2["text"])
    # nothing more may go: the budget can't be met, and the current exchange is untouched
    conv.budget = 10
    before = [(s.kind, s.exchange, s.size) for s in conv.ledger if s.exchange == 3]
    assert conv.fit_budget(0) == 0
    assert 2 not in kinds_left(conv)
    assert [(s.kind, s.exchange, s.size) for s in conv.ledger if s.exchange == 3] == before
    assert conv.ledger[0].kind == "system"


def test_disabled_refuses_and_retention_ratio_drops_its_share(tiny) -> None:
    kv = KVSlots.for_model(tiny[0].config.text_config, 3, SLOT_LEN, "cpu", torch.float32)
    stage = ThinkerStage(tiny[0], kv, StepScheduler(256, 4))
    convs = {}
    for key, truncation in [
        ("disabled", Truncation("disabled")),
        ("auto", Truncation()),
        ("ratio", Truncation("retention_ratio", 0.25)),
    ]:
        conv, _ = make(tiny, kv, truncation=truncation)
        convs[key] = conv
        for n in range(4):
            user_turn(conv, n)
            reply(stage, convs, key)
    evictable = sum(s.size for s in convs["auto"].ledger if 0 <= s.exchange < 2)
    grid_step = max(s.size for s in convs["auto"].ledger if s.kind == "video")
    for conv in convs.values():
        conv.budget = len(conv.tokens)
        conv.add_text("one more thing")
    disabled = convs["disabled"]
    cached = disabled.cached
    result = stage.step(convs)
    assert result.over == ["disabled"]  # refused, and nothing was dropped for it
    assert disabled.cached == cached and sum(s.size for s in disabled.ledger) == len(disabled.tokens)
    auto_left = sum(s.size for s in convs["auto"].ledger if 0 <= s.exchange < 2)
    ratio_left = sum(s.size for s in convs["ratio"].ledger if 0 <= s.exchange < 2)
    assert 0 < evictable - auto_left <= grid_step  # auto: just what it must (one grid step)
    assert evictable * 0.25 - grid_step <= ratio_left <= 0.25 * evictable  # keeps a quarter


def teacher_forced_logits(stage, convs, key: str, tokens: list[int]) -> list[torch.Tensor]:
    """The next-token logits after each of `tokens` (fed whatever the model would choose)."""
    conv = convs[key]
    conv.end_turn()
    r = conv.start_reply(len(tokens) + 1, greedy=True, min_tokens=len(tokens) + 1)
    out = []
    for token in tokens:
        while not conv.can_choose():
            assert not stage.step(convs).over
        out.append(r.logits.clone())
        r.logits = None
        r.tokens.append(token)
        conv._prefill_text([token], reply_token=True, logits_for=r)
    conv.cancel_reply()
    return out


def test_eviction_against_recompute(tiny, monkeypatch) -> None:
    """The same video call five times: old frames and audio evicted from three caches, two
    of them then rebuilt from the retained content (recompute: at closed-up positions, as the
    thinker does, and at the same positions, to tell the positions' share from the traces');
    the fourth keeps everything; the fifth is rebuilt without evicting (recompute is exact).
    Eviction keeps the remaining keys bitwise at their positions; its next-token logits differ
    from a recompute's by the evicted content's traces in later keys. Bounds that a wrong
    cache fails: eviction lands nearer the recompute than keeping everything does, a rebuild
    of everything equals the original, a garbage key changes the logits. Numbers: README."""
    kv = KVSlots.for_model(tiny[0].config.text_config, 5, SLOT_LEN, "cpu", torch.float32)
    stage = ThinkerStage(tiny[0], kv, StepScheduler(256, 4))
    keys = ("evicted", "recomputed", "same_positions", "kept", "rebuilt")
    convs = {}
    for key in keys:
        conv, _ = make(tiny, kv)
        convs[key] = conv
        for n in range(4):
            user_turn(conv, n)
            reply(stage, convs, key)
    evicted = convs["evicted"]
    keys_before = kv.keys[:, evicted.slot, :, : evicted.cached].clone()
    spans_before = [(s.start, s.end) for s in evicted.ledger]
    for key in ("evicted", "recomputed", "same_positions"):  # all old video and audio
        conv = convs[key]
        conv.budget = len(conv.tokens) - sum(
            s.size for s in conv.ledger if 0 <= s.exchange < 2 and s.kind in ("video", "audio")
        )
        conv.fit_budget(0)
        assert len(conv.tokens) == conv.budget
    # the kept keys are the old keys of the kept rows, in order (positions untouched)
    survivors = torch.cat([torch.arange(a, b) for a, b in _survivors(spans_before, evicted)])
    assert torch.equal(kv.keys[:, evicted.slot, :, : evicted.cached], keys_before[:, :, survivors])
    convs["recomputed"].recompute()
    assert convs["recomputed"].positions.next < evicted.positions.next  # gaps closed up
    assert torch.equal(convs["recomputed"].tokens.view(), evicted.tokens.view())
    with monkeypatch.context() as patch:  # a rebuild that moves no position
        patch.setattr(thinker_module, "position_map", lambda spans, n: torch.arange(2 * SLOT_LEN))
        convs["same_positions"].recompute()
        convs["rebuilt"].recompute()
    forced = list(range(100, 132))
    logits = {key: teacher_forced_logits(stage, convs, key, forced) for key in keys}

    def distance(x: str, y: str) -> float:  # mean |logit difference| over the steps
        return float(torch.stack([(a - b).abs().mean() for a, b in zip(logits[x], logits[y])]).mean())

    def agreement(x: str, y: str) -> float:  # top-1
        return sum(int(a.argmax() == b.argmax()) for a, b in zip(logits[x], logits[y])) / len(forced)

    spread = float(torch.stack([x.std() for x in logits["kept"]]).mean())
    for x, y in [
        ("evicted", "recomputed"),
        ("evicted", "same_positions"),
        ("recomputed", "same_positions"),
        ("kept", "same_positions"),
        ("kept", "rebuilt"),
    ]:
        print(f"{x} vs {y}: top-1 agreement {agreement(x, y):.2f}, mean |logit diff| {distance(x, y):.4f}")
    print(f"logits' std over the vocabulary: {spread:.4f}")
    assert distance("kept", "rebuilt") < 1e-4 and agreement("kept", "rebuilt") == 1.0
    assert distance("evicted", "same_positions") < 0.75 * distance("kept", "same_positions")
    kv.keys[:, evicted.slot, :, 5:6] = 0  # a cache left wrong (one garbage key) is caught
    broken = teacher_forced_logits(stage, convs, "evicted", forced[:4])
    assert max(float((x - y).abs().max()) for x, y in zip(broken, logits["evicted"])) > 1e-3


def _survivors(before: list[tuple[int, int]], conv: ThinkerConversation) -> list[tuple[int, int]]:
    """The old token ranges of the spans still in the ledger (spans are matched by order and
    size: eviction only removes spans)."""
    out, i = [], 0
    sizes = [b - a for a, b in before]
    for s in conv.ledger:
        while sizes[i] != s.size:
            i += 1
        out.append(before[i])
        i += 1
    return out


def tight_budget(tiny_checkpoint) -> EngineConfig:
    """Real workers with a 100-token budget in a 160-token slot."""
    return EngineConfig(
        str(tiny_checkpoint), max_context_tokens=160, context_budget_tokens=100, reply_reserve_tokens=60
    )


def test_disabled_truncation_through_the_workers(tiny_checkpoint) -> None:
    """truncation "disabled" on real workers: input past the budget is refused with a
    context_length_exceeded error and the session goes on; a reply that fills the context
    ends failed with it; deleting that reply makes room again."""

    async def run() -> None:
        errors: list[str] = []

        async def on_error(message: str) -> None:
            errors.append(message)

        options = SessionOptions(on_error=on_error, truncation=Truncation("disabled"))
        async with running_engine(tight_budget(tiny_checkpoint)) as engine:
            await engine.open_session("s", options)
            await engine.add_text("s", "Hello.")
            assert (await respond(engine, 4, "a1")).status == "completed"
            await engine.add_text("s", " ".join(f"word{i}" for i in range(100)))
            while not errors:
                await asyncio.sleep(0.05)
            assert "context_length_exceeded" in errors[0] and "disabled" in errors[0]
            assert (await respond(engine, 4, "a2")).status == "completed"  # it goes on
            full = await respond(engine, 1000, "a3")  # the reply fills the 160-token slot
            assert full.status == "failed" and "context_length_exceeded" in (full.error or "")
            assert 0 < full.text_tokens < 160
            await engine.delete_item("s", "a3")
            await engine.add_text("s", "Still there?")
            assert (await respond(engine, 4, "a4")).status == "completed"
            while "s" not in engine.context_tokens:  # the thinker's heartbeat, each second
                await asyncio.sleep(0.1)
            assert 0 < engine.context_tokens["s"] <= 160  # the budget's 100, and a reply's room

    asyncio.run(run())


def test_a_turn_bigger_than_the_budget_is_dropped_and_the_call_goes_on(tiny_checkpoint) -> None:
    """A spoken reply asked for after a turn that cannot fit (truncation auto: the turn in
    progress may not be evicted): the reply ends failed with context_length_exceeded, the
    turn leaves the model's context (the part that ran too), and the next spoken turn is
    answered with audio. (It once left the talker waiting for rows that never came.)"""

    async def run() -> None:
        async with running_engine(tight_budget(tiny_checkpoint)) as engine:
            await engine.open_session("s", SessionOptions())
            await engine.add_text("s", "Hello.")
            assert (await respond(engine, 4, "a0", audio=True)).status == "completed"
            await engine.add_text("s", " ".join(f"word{i}" for i in range(100)))
            failed = await respond(engine, 4, "a1", audio=True)
            assert failed.status == "failed" and "context_length_exceeded" in (failed.error or "")
            await engine.add_text("s", "Still there?")
            chunks: list[AudioChunk] = []
            done = await respond(engine, 4, "a2", audio=True, chunks=chunks)
            assert done.status == "completed" and done.text_tokens == 4 and chunks
            while "s" not in engine.context_tokens:  # the thinker's heartbeat, each second
                await asyncio.sleep(0.1)
            assert 0 < engine.context_tokens["s"] <= 100  # the big turn is gone
            replayed = b"".join(engine._sessions["s"].replay.messages())
            assert b"Still there?" in replayed and b"word99" not in replayed  # the log forgot it

    asyncio.run(asyncio.wait_for(run(), 180))


async def respond(
    engine, tokens: int, item: str, audio: bool = False, chunks: list | None = None
) -> ReplyDone:
    options = ReplyOptions(
        greedy=True,
        output_audio=audio,
        max_text_tokens=tokens,
        min_text_tokens=tokens,
        max_codec_tokens=8,
        item_id=item,
    )
    async for event in engine.respond("s", options):
        if isinstance(event, AudioChunk) and chunks is not None:
            chunks.append(event)
        if isinstance(event, ReplyDone):
            return event
    raise AssertionError("respond() ended without ReplyDone")


def test_positions_stay_in_range_by_recompute(tiny) -> None:
    """Eviction frees tokens, not positions: once they pass the limit the cache is rebuilt
    at closed-up positions, and the call goes on."""
    kv = KVSlots.for_model(tiny[0].config.text_config, 1, SLOT_LEN, "cpu", torch.float32)
    conv, mirror = make(tiny, kv, budget=800, position_limit=400)
    stage = ThinkerStage(tiny[0], kv, StepScheduler(256, 4))
    convs = {"s": conv}
    most = 0
    for n in range(12):
        user_turn(conv, n)
        assert len(reply(stage, convs, "s")) == 3
        most = max(most, conv.positions.next)
        assert conv.cached == len(conv.tokens) and conv.cached <= 800 + 3
        assert torch.equal(mirror.positions.view(), torch.cat([s.positions for s in conv.ledger], 1).T)
    assert mirror.rebuilds >= 2 and most < 400 + 200  # at most a turn past the limit
    assert max(int(s.positions.max()) for s in conv.ledger) < conv.positions.next


def test_talker_drops_the_same_rows_mid_reply(tiny_checkpoint) -> None:
    """The talker mirrors the thinker's context: an eviction while the talker speaks drops the
    same rows from its rows and its cache (the kept entries bitwise, the reply's codec
    entries moved down with them), and the reply speaks on to its end."""
    from omni.checkpoints.parts import load_speakers
    from omni.engine.talker import TalkerConversation, TalkerStage
    from omni.engine.talker_worker import special_embeds

    torch.set_grad_enabled(False)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = load_processor(tiny_checkpoint)
    special = special_embeds(str(tiny_checkpoint), model.talker, load_speakers(tiny_checkpoint))
    kv = KVSlots.for_model(model.thinker.config.text_config, 1, SLOT_LEN, "cpu", torch.float32)
    talker_kv = KVSlots.for_model(model.talker.config, 1, SLOT_LEN, "cpu", torch.float32)
    talker = TalkerConversation(model.talker, special, talker_kv)
    conv = thinker_conversation(
        model.thinker, processor, talker.add_rows, kv, on_evict=talker.evict_rows
    )
    stage = ThinkerStage(model.thinker, kv, StepScheduler(256, 4))
    talker_stage = TalkerStage(model.talker, talker_kv, StepScheduler(256, 4))
    convs = {"s": conv}
    for n in range(3):
        user_turn(conv, n)
        reply(stage, convs, "s")
    user_turn(conv, 3)
    conv.end_turn()
    r = conv.start_reply(6, greedy=True, min_tokens=6)
    first_row = len(conv.tokens)
    talker.start_reply(first_row, "Chelsie", greedy=True, max_codes=16, min_codes=16)
    while len(talker.reply.codes) < 4:  # the talker is speaking
        stage.step(convs)
        if conv.can_choose():
            token, last = conv.choose()
            if last:
                talker.text_ended(len(conv.tokens) - first_row)
        talker_stage.step({"s": talker})
    rows_before = talker.rows.view().clone()
    cache_before = talker_kv.keys[:, talker.slot, :, : talker_kv.lengths[talker.slot]].clone()
    spans = [(s.start, s.end) for s in conv.ledger]
    old_video = [s for s in conv.ledger if s.kind == "video" and s.exchange == 0]
    conv.evict(old_video)
    gone = [(s.start, s.end) for s in old_video]
    kept = torch.cat([torch.arange(a, b) for a, b in spans if (a, b) not in gone])
    kept = kept[kept < len(rows_before)]
    assert torch.equal(talker.rows.view(), rows_before[kept])
    in_cache = torch.cat([kept[kept < cache_before.shape[2]], torch.arange(first_row, cache_before.shape[2])])
    in_cache = torch.unique(in_cache)
    assert torch.equal(talker_kv.keys[:, talker.slot, :, : talker_kv.lengths[talker.slot]], cache_before[:, :, in_cache])
    assert talker.reply.first_row == first_row - sum(b - a for a, b in gone) == r.start_len
    while not talker.reply.done:
        stage.step(convs)
        if conv.can_choose():
            token, last = conv.choose()
            if last:
                talker.text_ended(len(conv.tokens) - r.start_len)
        talker_stage.step({"s": talker})
    assert len(talker.reply.codes) == 16
