"""Speculative replies in a session on the fake engine: a reply started at the caller's pause
is held until the turn ends (then sent, in order) or discarded unheard if the caller goes on."""

# ruff: noqa: F811 (the tests take the imported `harness` fixture by name)
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fake_engine import FakeEngine
from realtime_helpers import words
from test_session_flow import Harness, harness  # noqa: F401 (a fixture)

from omni.metrics import Metrics
from omni.session import AudioOut

RATE = 16_000


def spoken(text: str) -> np.ndarray:
    return np.frombuffer(words(text, RATE), dtype="<i2").astype(np.float32) / 32768


def quiet(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, np.float32)


async def push(h: Harness, audio: np.ndarray) -> None:
    for i in range(0, len(audio), 1600):
        await h.session.push_audio(audio[i : i + 1600])


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(token_delay=0.02)


async def speak_then_pause(h: Harness) -> None:
    """A sentence, then 300 ms of silence: a pause (200 ms) but not the stop (500 ms)."""
    await push(h, quiet(300))
    await push(h, spoken("I was thinking that we could go"))
    await push(h, quiet(300))


async def queued(h: Harness) -> list:
    """What the outbox holds now."""
    return [await h.session.outbox.get() for _ in range(h.session.outbox.qsize())]


async def test_a_reply_started_at_the_pause_is_held_then_sent_on_the_stop(
    harness: Harness, engine: FakeEngine
) -> None:
    h = harness
    await speak_then_pause(h)
    await asyncio.sleep(0.4)  # the held reply streams meanwhile
    assert [c for c, _ in engine.calls].count("respond") == 1
    held = await queued(h)
    assert [e["type"] for e in held] == ["input_audio_buffer.speech_started"]
    assert engine.conversation().history[0][1], "the reply ran while held"

    await push(h, quiet(400))
    events = await h.until("response.done")
    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    assert kinds[:2] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["metadata"]["speculation"] == "hit"
    user_item = events[1]["item_id"]
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert (
        next(
            e
            for e in events
            if e["type"] == "conversation.item.added" and e["item"]["id"] == added["item"]["id"]
        )["previous_item_id"]
        == user_item
    )
    assert [c for c, _ in engine.calls].count("respond") == 1  # no second reply
    # every audio chunk, in order, and the transcript is the whole reply
    samples = [a.first_sample for a in h.audio]
    assert h.audio and samples == sorted(samples) and samples[0] == 0
    assert done["output"][0]["content"][0]["transcript"] == engine.conversation().reply_text()
    assert 0 <= float(done["metadata"]["vad_end_to_first_audio_ms"]) < 1000
    assert counter(h.session.metrics, "omni_speculations_total", outcome="hit") == 1


async def test_a_reply_discarded_when_the_caller_goes_on_is_never_heard(
    harness: Harness, engine: FakeEngine
) -> None:
    h = harness
    first, second = spoken("I was thinking that"), spoken("we could go tomorrow")
    await push(h, quiet(300))
    await push(h, first)
    await push(h, quiet(400))
    await asyncio.sleep(0.3)  # the speculative reply streams, held
    (discarded_options,) = engine.conversation().replies
    await push(h, second)  # a resume: the guess was wrong
    await h.settle()
    assert engine.conversation().discarded == [discarded_options.item_id]
    await push(h, quiet(900))
    events = await h.until("response.done")
    await asyncio.sleep(0.1)
    events += await queued(h)
    text = str(events)
    assert discarded_options.item_id not in text  # no event of the discarded reply
    assert [e["type"] for e in events].count("response.created") == 1
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert {a.response_id for a in h.audio} == {done["id"]}
    assert all(not isinstance(e, AudioOut) for e in events)
    # one user turn holding all of the speech, one reply to it
    conversation = engine.conversation()
    assert len(conversation.history) == 1
    turn = conversation.history[0][0]
    assert turn.audio_samples >= len(first) + len(second)
    assert done["metadata"]["speculation"] in ("hit", "miss")
    metrics = h.session.metrics
    assert counter(metrics, "omni_speculations_total", outcome="miss") == 1
    assert counter(metrics, "omni_speculation_discarded_total", unit="text_tokens") > 0


async def test_a_client_event_in_the_pause_makes_the_guess_moot(
    harness: Harness, engine: FakeEngine
) -> None:
    h = harness
    await speak_then_pause(h)
    await asyncio.sleep(0.1)
    await h.send({"type": "input_audio_buffer.commit"})
    await h.send({"type": "response.create"})
    events = await h.until("response.done")
    assert [e["type"] for e in events].count("response.created") == 1
    assert "speculation" not in events[-1]["response"]["metadata"]
    assert len(engine.conversation().discarded) == 1
    assert len(engine.conversation().history) == 1


@pytest.mark.parametrize("harness", [{"speculative_pause_ms": 0}], indirect=True)
async def test_off_the_reply_starts_at_the_stop(harness: Harness, engine: FakeEngine) -> None:
    h = harness
    await speak_then_pause(h)
    await asyncio.sleep(0.2)
    assert "respond" not in [c for c, _ in engine.calls]
    await push(h, quiet(400))
    done = (await h.until("response.done"))[-1]["response"]
    assert "speculation" not in done["metadata"]
