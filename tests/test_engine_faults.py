"""Cancel, crash, hang and an unread reply: errors are reported, nothing hangs, and the next
turn works.

All through the real worker processes on the tiny checkpoint.
"""

from __future__ import annotations

import asyncio

import pytest

from omni.engine import engine as engine_module
from omni.engine.api import AudioChunk, ReplyDone, ReplyOptions, SessionOptions, TextDelta
from omni.engine.engine import EngineConfig, OmniEngine
from omni.engine.heard import PRIOR_CODES_PER_TOKEN

LONG = ReplyOptions(greedy=True, max_text_tokens=200, max_codec_tokens=250)
SHORT = ReplyOptions(greedy=True, max_text_tokens=5, max_codec_tokens=30)


async def collect(engine: OmniEngine, session: str, options: ReplyOptions, on_event=None) -> ReplyDone:
    async for event in engine.respond(session, options):
        if on_event is not None:
            await on_event(event)
        if isinstance(event, ReplyDone):
            return event
    raise AssertionError("respond() ended without ReplyDone")


@pytest.fixture
def run(tiny_checkpoint):
    """Run a coroutine against a fresh engine with fault injection on."""

    def runner(body, heartbeat_timeout_s: float = 30.0):
        async def main():
            engine = OmniEngine(
                EngineConfig(
                    str(tiny_checkpoint), allow_faults=True, heartbeat_timeout_s=heartbeat_timeout_s
                )
            )
            await engine.start()
            try:
                notices: list[str] = []

                async def on_error(message: str) -> None:
                    notices.append(message)

                await engine.open_session("s", SessionOptions(on_error=on_error))
                engine.notices = notices  # what the session was told outside its calls
                return await asyncio.wait_for(body(engine), timeout=180)
            finally:
                await engine.stop()

        return asyncio.run(main())

    return runner


def test_cancel_mid_reply_keeps_what_was_said(run):
    async def body(engine: OmniEngine):
        await engine.add_text("s", "Tell me a long story.")
        heard = []

        async def on_event(event):
            if isinstance(event, AudioChunk):
                heard.append(event)
                if len(heard) == 1:
                    await engine.cancel("s")

        done = await collect(engine, "s", LONG, on_event)
        assert done.status == "cancelled"
        # the thinker runs ahead of speech (text may be complete); the speech stopped early
        assert done.text_tokens > 0 and done.audio_samples < 250 * 480
        # the conversation goes on, and the truncation to what was heard works after a cancel:
        # all the audio sent was heard, but it spoke far fewer tokens than its 20 ms steps
        # (the speech was stopped, so heard.py's prior speaking rate estimates how many)
        codes = done.audio_samples / 480
        kept = await engine.truncate_reply("s", audio_ms=done.audio_samples // 24)
        assert codes > 2 and kept <= codes / PRIOR_CODES_PER_TOKEN + 1
        assert kept < min(codes, done.text_tokens)  # 20 ms a token would keep more
        await engine.add_text("s", "Go on.")
        after = await collect(engine, "s", SHORT)
        assert after.status == "completed" and after.audio_samples == 30 * 480

    run(body)


@pytest.mark.parametrize("worker", ["thinker", "talker"])
def test_crashed_worker_is_reported_and_restarted(run, worker):
    async def body(engine: OmniEngine):
        await engine.add_text("s", "Hello?")
        engine.inject_fault(worker, "crash", after_steps=3)
        done = await collect(engine, "s", LONG)
        assert done.status == "failed"
        assert f"the {worker} worker died" in (done.error or "")
        # the session heard of it too, before the reply ended (the supervisor tells it first)
        assert len(engine.notices) == 1
        assert f"the {worker} worker died" in engine.notices[0]
        assert "the reply in progress failed" in engine.notices[0]
        while not engine.ready:  # the supervisor restarts both workers
            await asyncio.sleep(0.1)
        assert engine.restarts == 1
        await engine.add_text("s", "Are you back?")
        after = await collect(engine, "s", SHORT)
        assert after.status == "completed" and after.text_tokens == 5

    run(body)


def test_hung_worker_is_noticed(run):
    async def body(engine: OmniEngine):
        await engine.add_text("s", "Hello?")
        engine.inject_fault("talker", "hang", after_steps=2)
        done = await collect(engine, "s", LONG)
        assert done.status == "failed"
        assert "the talker worker stopped responding" in (done.error or "")
        assert "the talker worker stopped responding" in engine.notices[0]
        while not engine.ready:
            await asyncio.sleep(0.1)
        await engine.add_text("s", "Still there?")
        after = await collect(engine, "s", SHORT)
        assert after.status == "completed"

    # short enough for a test, long enough that a slow vocoder chunk on a busy CPU isn't a hang
    run(body, heartbeat_timeout_s=10.0)


def test_input_during_a_restart_reaches_the_new_workers(run):
    async def body(engine: OmniEngine):
        await engine.add_text("s", "Hello?")
        engine.inject_fault("thinker", "crash", after_steps=0)
        done = await collect(engine, "s", SHORT)  # the first decode step crashes it
        assert done.status == "failed"
        assert not engine.ready  # the reply ended as the restart began
        await engine.add_text("s", "Did you hear this?")  # logged, not refused
        while not engine.ready:
            await asyncio.sleep(0.1)
        after = await collect(engine, "s", SHORT)
        assert after.status == "completed"
        # the turn is the text: as long as in a new session, plus the end of the failed reply
        # (it crashed before streaming a token: <|im_end|> and a newline)
        await engine.open_session("t", SessionOptions())
        await engine.add_text("t", "Did you hear this?")
        fresh = await collect(engine, "t", SHORT)
        assert after.input_tokens == fresh.input_tokens + 2

    run(body)


def test_a_reply_nobody_reads_is_cancelled(run, monkeypatch):
    """The reader task never waits: a reply whose queue is full ends failed, and its workers
    stop (the next reply would otherwise be refused as 'already in progress')."""
    monkeypatch.setattr(engine_module, "REPLY_QUEUE_MAX", 8)
    unread = ReplyOptions(greedy=True, output_audio=False, max_text_tokens=100, min_text_tokens=100)

    async def body(engine: OmniEngine):
        await engine.add_text("s", "Talk for a while.")
        stream = engine.respond("s", unread)
        first = await anext(stream)
        assert isinstance(first, TextDelta)
        while not any(r.ended for r in engine._replies.values()):  # the reader gives up on it
            await asyncio.sleep(0.05)
        events = [event async for event in stream]
        done = events[-1]
        assert isinstance(done, ReplyDone) and done.status == "failed"
        assert "its reader left 8 messages unread" in (done.error or "")
        assert len(events) <= 8 + 1
        await engine.add_text("s", "Short now.")
        after = await collect(engine, "s", SHORT)
        assert after.status == "completed"

    run(body)
