"""Input caps that fit the model: each refusal is an error naming its setting and value, the
refused input never reaches the engine, and the session goes on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from fake_engine import FakeEngine
from realtime_helpers import b64, data_url, image_bytes, silence

from omni.metrics import Metrics
from omni.session import AudioOut, RealtimeSession
from omni.session.wire_audio import PCM16K, PCM24K, AudioFormat
from omni.settings import Settings

MANUAL = {
    "type": "session.update",
    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
}


class Caller:
    """A session driven directly, its server events read in order."""

    def __init__(self, session: RealtimeSession) -> None:
        self.session = session

    async def send(self, event: dict[str, Any]) -> None:
        await self.session.handle_message(json.dumps(event))

    async def next(self, kind: str) -> dict[str, Any]:
        while True:
            out = await asyncio.wait_for(self.session.outbox.get(), 10.0)
            if not isinstance(out, AudioOut) and out["type"] == kind:
                return out

    async def settle(self) -> None:
        while not self.session._engine._calls.empty():  # noqa: ASYNC110 (a test probe)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def caller(engine: FakeEngine, request: pytest.FixtureRequest) -> AsyncIterator[Caller]:
    session = RealtimeSession(engine, Settings(**getattr(request, "param", {})), Metrics())
    await session.start()
    c = Caller(session)
    await c.next("session.created")
    await c.send(MANUAL)
    await c.next("session.updated")
    yield c
    await session.close()


def user_item(*content: dict[str, Any]) -> dict[str, Any]:
    item = {"type": "message", "role": "user", "content": list(content)}
    return {"type": "conversation.item.create", "item": item}


def text_item(text: str) -> dict[str, Any]:
    return user_item({"type": "input_text", "text": text})


def audio_item(pcm16: bytes) -> dict[str, Any]:
    return user_item({"type": "input_audio", "audio": b64(pcm16)})


def test_wire_seconds_by_format() -> None:
    assert PCM24K.seconds(48_000) == 1.0
    assert PCM16K.seconds(32_000) == 1.0
    assert AudioFormat("pcmu", 8_000).seconds(8_000) == 1.0


@pytest.mark.parametrize("caller", [{"max_input_text_chars": 100}], indirect=True)
async def test_long_text_is_refused_naming_the_limit(caller: Caller, engine: FakeEngine) -> None:
    await caller.send({**text_item("x" * 101), "event_id": "t1"})
    error = (await caller.next("error"))["error"]
    assert (error["code"], error["event_id"]) == ("input_text_too_long", "t1")
    assert error["param"] == "item.content.0.text"
    assert "101 characters" in error["message"] and "100 (max_input_text_chars)" in error["message"]
    await caller.send(text_item("y" * 100))  # at the limit: taken
    await caller.next("conversation.item.added")
    await caller.settle()
    assert engine.conversation().turn.texts == ["y" * 100]


@pytest.mark.parametrize("caller", [{"max_buffered_audio_seconds": 1.0}], indirect=True)
async def test_long_audio_item_is_refused_before_decoding(
    caller: Caller, engine: FakeEngine
) -> None:
    await caller.send(audio_item(silence(1500)))
    error = (await caller.next("error"))["error"]
    assert error["code"] == "input_audio_too_long" and error["param"] == "item.content.0.audio"
    assert "1.5 s" in error["message"]
    assert "1 s limit (max_buffered_audio_seconds)" in error["message"]
    await caller.send(audio_item(silence(900)))
    await caller.next("conversation.item.added")
    await caller.settle()
    assert engine.conversation().turn.audio_samples == pytest.approx(0.9 * 16_000, abs=160)


@pytest.mark.parametrize("caller", [{"max_buffered_audio_seconds": 1.0}], indirect=True)
async def test_an_append_longer_than_the_buffer_is_refused_whole(
    caller: Caller, engine: FakeEngine
) -> None:
    await caller.send({"type": "input_audio_buffer.append", "audio": b64(silence(2000))})
    error = (await caller.next("error"))["error"]
    assert error["code"] == "input_audio_too_long" and error["param"] == "audio"
    assert "max_buffered_audio_seconds" in error["message"]
    await caller.settle()
    assert engine.conversation().turn.audio_samples == 0  # nothing of it went in
    await caller.send({"type": "input_audio_buffer.append", "audio": b64(silence(500))})
    await caller.send({"type": "input_audio_buffer.commit"})
    await caller.next("input_audio_buffer.committed")


@pytest.mark.parametrize("caller", [{"max_buffered_audio_seconds": 1.0}], indirect=True)
async def test_the_buffer_cap_names_its_setting(caller: Caller) -> None:
    for _ in range(3):
        await caller.send({"type": "input_audio_buffer.append", "audio": b64(silence(600))})
    error = (await caller.next("error"))["error"]
    assert error["code"] == "input_audio_buffer_full"
    assert "1 s of uncommitted audio (max_buffered_audio_seconds)" in error["message"]


@pytest.mark.parametrize("caller", [{"image_max_pixels": 200_000}], indirect=True)
async def test_a_large_still_image_is_scaled_to_the_pixel_cap(
    caller: Caller, engine: FakeEngine
) -> None:
    image = {"type": "input_image", "image_url": data_url(image_bytes(4000, 3000))}
    await caller.send(user_item(image))
    await caller.next("conversation.item.added")
    await caller.settle()
    ((width, height),) = engine.conversation().turn.images
    assert width * height <= 200_000 and abs(width / height - 4 / 3) < 0.01


@pytest.mark.parametrize("caller", [{"video_max_fps": 0.5}], indirect=True)
async def test_frames_over_the_configured_rate_are_dropped(
    caller: Caller, engine: FakeEngine
) -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    for _ in range(5):  # far less than the 2 s interval apart
        await caller.session.push_video_frame(frame)
    await caller.settle()
    assert engine.conversation().turn.frames == 1


async def test_frames_at_the_default_rate_go_in(caller: Caller, engine: FakeEngine) -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    await caller.session.push_video_frame(frame)
    await asyncio.sleep(0.55)  # past the 0.5 s interval of 2 frames per second
    await caller.session.push_video_frame(frame)
    await caller.settle()
    assert engine.conversation().turn.frames == 2
