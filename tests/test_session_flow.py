"""RealtimeSession driven directly (no network), as a WebRTC gateway would: turns, the input
buffer, items, truncation, server-side playout on barge-in, frames, failures and expiry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from fake_engine import FakeEngine
from realtime_helpers import b64, data_url, image_bytes, silence, speech

from omni.metrics import Metrics
from omni.session import AudioOut, Closed, Played, RealtimeSession
from omni.settings import Settings

MANUAL = {
    "type": "session.update",
    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
}


class Harness:
    def __init__(self, session: RealtimeSession) -> None:
        self.session = session
        self.audio: list[AudioOut] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.session.handle_message(json.dumps(event))

    async def until(self, kind: str) -> list[dict[str, Any]]:
        """Events up to the first `kind` (reply audio is collected in `self.audio`)."""
        events: list[dict[str, Any]] = []
        while True:
            out = await asyncio.wait_for(self.session.outbox.get(), 10.0)
            if isinstance(out, AudioOut):
                self.audio.append(out)
                continue
            if isinstance(out, Closed):
                events.append({"type": "closed", "reason": out.reason})
            else:
                events.append(out)
            if events[-1]["type"] == kind:
                return events

    async def settle(self) -> None:
        """Let the engine queue catch up with what was sent."""
        while not self.session._engine._calls.empty():  # noqa: ASYNC110 (a test probe, no event)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def harness(engine: FakeEngine, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    settings = Settings(**getattr(request, "param", {}))
    session = RealtimeSession(engine, settings, Metrics())
    await session.start()
    h = Harness(session)
    assert (await h.until("session.created"))[-1]["session"]["id"] == session.id
    yield h
    await session.close()
    assert engine.violations == []  # one engine call at a time, always


async def manual(h: Harness) -> None:
    await h.send(MANUAL)
    assert (await h.until("session.updated"))[-1]["session"]["audio"]["input"][
        "turn_detection"
    ] is None


async def test_manual_turn_streams_audio_before_commit(h: Harness, engine: FakeEngine) -> None:
    await manual(h)
    await h.send({"type": "input_audio_buffer.append", "audio": b64(silence(500))})
    await h.settle()
    # incremental prefill: the engine has the audio before the turn is committed
    assert engine.conversation().turn.audio_samples > 7000
    await h.send({"type": "input_audio_buffer.append", "audio": b64(silence(500))})
    await h.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
    committed = await h.until("conversation.item.done")
    assert [e["type"] for e in committed] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    item_id = committed[0]["item_id"]
    await h.send({"type": "response.create"})
    done = (await h.until("response.done"))[-1]["response"]
    assert done["status"] == "completed"
    assert "I heard 1.0 seconds" in done["output"][0]["content"][0]["transcript"]
    assert h.audio and all(a.pcm.dtype == np.int16 for a in h.audio)
    await h.send({"type": "conversation.item.retrieve", "item_id": item_id})
    assert (await h.until("conversation.item.retrieved"))[-1]["item"]["content"][0][
        "type"
    ] == "input_audio"


async def test_commit_of_an_empty_buffer_is_an_error(h: Harness) -> None:
    await manual(h)
    await h.send({"type": "input_audio_buffer.commit", "event_id": "c9"})
    error = (await h.until("error"))[-1]["error"]
    assert (error["code"], error["event_id"]) == ("input_audio_buffer_commit_empty", "c9")


async def test_clear_keeps_committed_audio(h: Harness, engine: FakeEngine) -> None:
    await manual(h)
    await h.send({"type": "input_audio_buffer.append", "audio": b64(silence(400))})
    await h.send({"type": "input_audio_buffer.commit"})
    await h.send({"type": "input_audio_buffer.append", "audio": b64(silence(700))})
    await h.send({"type": "input_audio_buffer.clear"})
    await h.until("input_audio_buffer.cleared")
    await h.settle()
    assert abs(engine.conversation().turn.audio_samples - 6400) < 200


async def test_uncommitted_audio_waits_for_the_next_turn(h: Harness, engine: FakeEngine) -> None:
    await manual(h)
    await h.send({"type": "input_audio_buffer.append", "audio": b64(silence(1000))})
    await h.send({"type": "input_audio_buffer.commit"})
    await h.send({"type": "input_audio_buffer.append", "audio": b64(silence(2000))})
    await h.send({"type": "response.create"})
    done = (await h.until("response.done"))[-1]["response"]
    assert "I heard 1.0 seconds" in done["output"][0]["content"][0]["transcript"]
    await h.settle()
    assert abs(engine.conversation().turn.audio_samples - 32000) < 400


async def test_text_and_image_item_then_text_reply(h: Harness, engine: FakeEngine) -> None:
    await h.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this"},
                    {"type": "input_image", "image_url": data_url(image_bytes(64, 48))},
                ],
            },
        }
    )
    added = await h.until("conversation.item.done")
    assert [p["type"] for p in added[0]["item"]["content"]] == ["input_text", "input_image"]
    await h.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
    events = await h.until("response.done")
    kinds = [e["type"] for e in events]
    assert (
        "response.output_text.delta" in kinds
        and "response.output_audio_transcript.delta" not in kinds
    )
    text = next(e["text"] for e in events if e["type"] == "response.output_text.done")
    assert "You said: what is this" in text and "I see a 64x48 image" in text
    assert h.audio == [] and engine.conversation().replies[-1].output_audio is False


async def test_delete_pending_and_older_items(h: Harness, engine: FakeEngine) -> None:
    for text in ("first", "second"):
        await h.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "id": f"item_{text}",
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
    await h.send({"type": "conversation.item.delete", "item_id": "item_first"})
    await h.until("conversation.item.deleted")
    await h.settle()
    assert engine.conversation().turn.texts == ["second"]
    await h.send({"type": "response.create"})
    reply = (await h.until("response.done"))[-1]["response"]["output"][0]["id"]
    await h.send({"type": "conversation.item.delete", "item_id": reply})
    await h.until("conversation.item.deleted")
    await h.settle()
    assert engine.conversation().reply_text() == ""  # the model forgot what it said
    # an item the model already has (older than the latest) goes from its memory too
    await h.send({"type": "conversation.item.delete", "item_id": "item_second"})
    await h.until("conversation.item.deleted")
    await h.settle()
    assert engine.conversation().deleted == [reply, "item_second"]
    await h.send({"type": "conversation.item.delete", "item_id": "item_second", "event_id": "d3"})
    error = (await h.until("error"))[-1]["error"]
    assert (error["code"], error["event_id"]) == ("item_not_found", "d3")


async def test_truncate_keeps_heard_text(h: Harness, engine: FakeEngine) -> None:
    await h.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            },
        }
    )
    await h.send({"type": "response.create"})
    done = (await h.until("response.done"))[-1]["response"]
    item = done["output"][0]
    full = item["content"][0]["transcript"]
    words = len(full.split())
    # cut at 30 % of the reply's audio: about 30 % of its words were spoken (20 ms a token
    # would keep them all: the fake speaks a codec step per character)
    audio_end_ms = done["usage"]["output_token_details"]["audio_tokens"] * 20 * 3 // 10
    await h.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item["id"],
            "content_index": 0,
            "audio_end_ms": audio_end_ms,
        }
    )
    truncated = (await h.until("conversation.item.truncated"))[-1]
    assert truncated["audio_end_ms"] == audio_end_ms
    await h.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
    kept = (await h.until("conversation.item.retrieved"))[-1]["item"]["content"][0]["transcript"]
    assert kept == engine.conversation().reply_text()
    assert abs(len(engine.conversation().history[-1][1]) / words - 0.3) <= 0.1
    assert full.startswith(kept) and abs(len(kept.split()) / words - 0.3) <= 0.1
    await h.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item["id"],
            "content_index": 0,
            "audio_end_ms": 60_000,
            "event_id": "t2",
        }
    )
    error = (await h.until("error"))[-1]["error"]
    assert (error["code"], error["param"], error["event_id"]) == (
        "invalid_value",
        "audio_end_ms",
        "t2",
    )


class FakePlayout:
    """A WebRTC track's playback: it has played 200 ms of whatever item is current."""

    def __init__(self) -> None:
        self.current: AudioOut | None = None
        self.cleared = 0

    def clear(self) -> Played | None:
        self.cleared += 1
        if self.current is None:
            return None
        played, self.current = Played(self.current.response_id, self.current.item_id, 200), None
        return played


async def test_webrtc_barge_in_truncates_to_playout(engine: FakeEngine) -> None:
    playout = FakePlayout()
    session = RealtimeSession(engine, Settings(), Metrics(), playout=playout)
    await session.start()
    h = Harness(session)
    await h.session.push_audio(np.zeros(8000, np.float32))
    words = (
        np.frombuffer(speech("Tell me a long story please", 16000), dtype="<i2").astype(np.float32)
        / 32768
    )
    await h.session.push_audio(words)
    await h.session.push_audio(np.zeros(16000, np.float32))
    await h.until("response.created")
    while sum(len(a.pcm) for a in h.audio) < 24 * 300:  # the gateway's track is playing the reply
        await h.until("response.output_audio_transcript.delta")
    playout.current = h.audio[0]
    await h.session.push_audio(words)  # the caller talks over it
    events = await h.until("conversation.item.truncated")
    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    assert kinds.index("output_audio_buffer.cleared") < kinds.index("conversation.item.truncated")
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "turn_detected")
    assert events[-1]["audio_end_ms"] == 200
    # 200 ms played = 10 codec steps: about 10 characters at the fake's step a character (to
    # a word either way), not 10 words
    kept = "".join(engine.conversation().history[0][1])
    assert abs(len(kept) - 200 // (20 * engine.codes_per_char)) <= 8
    await session.close()
    assert engine.violations == []


async def test_frames_are_rate_limited_and_wait_for_speech(h: Harness, engine: FakeEngine) -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    for _ in range(3):
        await h.session.push_video_frame(frame)
    await h.settle()
    assert engine.conversation().turn.frames == 0  # server_vad, nobody talking: held back
    await h.send(
        {"type": "input_image_buffer.append", "image": b64(image_bytes()), "event_id": "f1"}
    )
    assert (await h.until("error"))[-1]["error"]["code"] == "image_before_audio"
    await manual(h)
    await asyncio.sleep(0.5)
    for _ in range(3):
        await h.session.push_video_frame(frame)
    await h.settle()
    assert engine.conversation().turn.frames == 1  # at most 2 per second


async def test_engine_failure_fails_the_response_not_the_session(
    h: Harness, engine: FakeEngine
) -> None:
    engine.fail_next_reply = "GPU fell over"
    await h.send({"type": "response.create"})
    done = (await h.until("response.done"))[-1]["response"]
    assert (
        done["status"] == "failed" and "GPU fell over" in done["status_details"]["error"]["message"]
    )
    await h.send({"type": "response.create"})
    assert (await h.until("response.done"))[-1]["response"]["status"] == "completed"


async def test_one_response_at_a_time_and_cancel(h: Harness) -> None:
    await h.send({"type": "response.cancel", "event_id": "x1"})
    assert (await h.until("error"))[-1]["error"]["code"] == "response_cancel_not_active"
    await h.send({"type": "response.create"})
    await h.until("response.created")
    await h.send({"type": "response.create", "event_id": "x2"})
    error = (await h.until("error"))[-1]["error"]
    assert (error["code"], error["event_id"]) == ("conversation_already_has_active_response", "x2")
    await h.send({"type": "response.cancel"})
    done = (await h.until("response.done"))[-1]["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")


async def test_beta_client_is_answered_in_beta(h: Harness) -> None:
    await h.send(
        {
            "type": "session.update",
            "session": {"modalities": ["text", "audio"], "voice": "Ethan", "turn_detection": None},
        }
    )
    session = (await h.until("session.updated"))[-1]["session"]
    assert (
        session["voice"] == "Ethan" and "audio" not in session and session["turn_detection"] is None
    )
    await h.send({"type": "response.create"})
    events = await h.until("response.done")
    kinds = {e["type"] for e in events}
    assert "response.audio_transcript.delta" in kinds and "conversation.item.created" in kinds
    assert not {"response.output_audio_transcript.delta", "conversation.item.done"} & kinds
    assert h.session.render_audio(h.audio[0])["type"] == "response.audio.delta"


@pytest.mark.parametrize("harness", [{"max_session_seconds": 0.3}], indirect=True)
async def test_session_length_cap(h: Harness, engine: FakeEngine) -> None:
    events = await h.until("closed")
    assert events[-2]["error"]["code"] == "session_expired"
    assert h.session.id in engine.closed


@pytest.mark.parametrize("harness", [{"max_buffered_audio_seconds": 1.0}], indirect=True)
async def test_buffered_audio_cap(h: Harness, engine: FakeEngine) -> None:
    await manual(h)
    for _ in range(3):
        await h.send(
            {"type": "input_audio_buffer.append", "audio": b64(silence(600)), "event_id": "a"}
        )
    error = (await h.until("error"))[-1]["error"]
    assert (error["code"], error["event_id"]) == ("input_audio_buffer_full", "a")
    await h.settle()
    assert engine.conversation().turn.audio_samples <= 16000
    await h.send({"type": "input_audio_buffer.commit"})  # what fit is kept and usable
    await h.until("input_audio_buffer.committed")


@pytest.fixture
def h(harness: Harness) -> Harness:
    return harness


async def test_input_audio_item_reaches_the_engine(h: Harness, engine: FakeEngine) -> None:
    await h.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_audio", "audio": b64(silence(1000))}],
            },
        }
    )
    item = (await h.until("conversation.item.done"))[-1]["item"]
    assert item["content"] == [{"type": "input_audio", "transcript": None}]
    await h.settle()
    assert engine.conversation().turn.audio_samples == 16000


async def test_concurrent_pushes_keep_arrival_order(h: Harness, engine: FakeEngine) -> None:
    # a WebRTC track and data-channel events may push at once; VAD state must not interleave
    words = np.frombuffer(speech("hello there", 16000), dtype="<i2").astype(np.float32) / 32768
    audio = np.concatenate([np.zeros(8000, np.float32), words, np.zeros(16000, np.float32)])
    pieces = [audio[i : i + 1600] for i in range(0, len(audio), 1600)]
    await asyncio.gather(*(h.session.push_audio(piece) for piece in pieces))
    events = await h.until("input_audio_buffer.committed")
    kinds = [e["type"] for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == 1
    assert "input_audio_buffer.speech_stopped" in kinds
    await h.until("response.done")
    received = np.concatenate(engine.conversation().history[0][0].audio)
    start = events[0]["audio_start_ms"] * 16
    np.testing.assert_array_equal(received, audio[start : start + len(received)])


async def test_truncation_and_context_length_exceeded(h: Harness, engine: FakeEngine) -> None:
    ratio = {"type": "retention_ratio", "retention_ratio": 0.5}
    await h.send({"type": "session.update", "session": {"type": "realtime", "truncation": ratio}})
    assert (await h.until("session.updated"))[-1]["session"]["truncation"] == ratio
    await h.settle()
    assert engine.conversation().options.truncation.retention_ratio == 0.5
    bad = {"type": "retention_ratio", "retention_ratio": 2.0}
    await h.send({"type": "session.update", "session": {"truncation": bad}, "event_id": "t1"})
    error = (await h.until("error"))[-1]["error"]
    assert error["event_id"] == "t1" and "truncation" in (error["param"] or "")
    # the engine's context_length_exceeded keeps its code on the way to the client
    engine.fail_next_reply = "context_length_exceeded: the conversation would pass its budget"
    await h.send({"type": "response.create"})
    done = (await h.until("response.done"))[-1]["response"]
    assert done["status_details"]["error"]["code"] == "context_length_exceeded"


async def test_cancelled_text_reply_keeps_what_was_sent(h: Harness, engine: FakeEngine) -> None:
    await h.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
    deltas = [e for e in await h.until("response.output_text.delta")]
    await h.send({"type": "response.cancel"})
    events = await h.until("response.done")
    sent = "".join(e["delta"] for e in deltas + events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["output"][0]["content"][0]["text"] == sent
    await h.settle()
    assert "".join(engine.conversation().history[-1][1]) == sent  # the model kept no more
