"""WebRTC calls end to end with a Python aiortc client (no browser): OpenAI's signalling,
events on `oai-events`, spoken turns in, the reply's audio out, barge-in and truncation to
what was played, camera frames, hang-up."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from aiortc import VideoStreamTrack
from av import VideoFrame
from fake_engine import FakeEngine, fake_engine
from realtime_helpers import API_KEY, RunningServer, running_server, speech

from omni.bench.calls import CallClient

pytest_plugins = ["gateway_fixtures"]

QUESTION = "Hello there, how are you?"


def utterance(text: str = QUESTION) -> np.ndarray:
    return np.frombuffer(speech(text), np.int16)


def base_url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@asynccontextmanager
async def call(server: RunningServer, **kwargs: Any) -> AsyncIterator[CallClient]:
    client = CallClient(base_url(server), API_KEY, **kwargs)
    response = await client.connect()
    assert response.status_code == 201, response.text
    try:
        yield client
    finally:
        await client.close()


async def test_voice_call_one_turn(start_server: Any) -> None:
    async with start_server() as server, call(server) as client:
        assert client.location is not None and client.location.startswith("/v1/realtime/calls/rtc_")
        created = await client.expect("session.created")
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"

        ended = await client.say(utterance())
        started = await client.expect("input_audio_buffer.speech_started")
        await client.expect("input_audio_buffer.speech_stopped")
        heard = await client.first_sound_after(ended)
        assert heard - ended < 5.0
        await client.expect("response.output_audio_transcript.delta")
        done = (await client.expect("response.done"))["response"]
        assert done["status"] == "completed"
        await client.seen("output_audio_buffer.started", response_id=done["id"])
        await client.seen("output_audio_buffer.stopped", response_id=done["id"])
        if isinstance(server.engine, FakeEngine):
            transcript = done["output"][0]["content"][0]["transcript"]
            assert transcript.startswith("Reply 1. I heard")
            spoken = server.engine.conversation().history[0][0].audio_samples / 16_000
            assert abs(spoken - (len(utterance()) / 24_000 + 0.3)) < 0.5  # + prefix padding
        assert started["item_id"] == done["output"][0]["id"] or started["item_id"]

        assert await client.hang_up() == 204
        assert server.gateway.sessions == set()
        assert await CallClient(base_url(server), API_KEY).hang_up() is None  # nothing placed


async def test_barge_in_truncates_to_what_was_played() -> None:
    # a long reply (about 40 s of speech, 4 s to make) still being made at the barge-in
    factory = lambda: fake_engine(filler_tokens=400)
    async with running_server(factory) as server, call(server) as client:
        await client.expect("session.created")
        ended = await client.say(utterance())
        first = await client.first_sound_after(ended)
        await asyncio.sleep(1.0)
        barge = asyncio.create_task(client.say(utterance("Wait, stop.")))
        await client.expect("input_audio_buffer.speech_started")
        cleared = await client.expect("output_audio_buffer.cleared")
        cleared_at = time.monotonic()
        truncated = await client.expect("conversation.item.truncated")
        done = await client.seen("response.done", timeout=10)
        assert done["response"]["status"] == "cancelled"
        assert cleared["response_id"] == done["response"]["id"]
        await barge
        await asyncio.sleep(0.3)  # let any stragglers arrive

        # what the caller received of the first reply is what the server says was played
        reply = [t for t in client.loud if first <= t <= cleared_at + 0.3]
        received_ms = len(reply) * 20
        assert 1000 <= truncated["audio_end_ms"] <= 4000
        assert abs(received_ms - truncated["audio_end_ms"]) <= 60
        # and the model keeps the words that much of its reply spoke (not one per 20 ms)
        engine = server.engine
        assert isinstance(engine, FakeEngine)
        kept = engine.conversation().history[0][1]
        chars = truncated["audio_end_ms"] // (20 * engine.codes_per_char)
        assert abs(len("".join(kept)) - chars) <= 10  # to a word; not a word per 20 ms
        transcript = done["response"]["output"][0]["content"][0]["transcript"]
        assert len(transcript.split()) < 200


class CameraTrack(VideoStreamTrack):
    """A small test picture at 10 frames per second (cheap to encode)."""

    def __init__(self, width: int = 640, height: int = 360) -> None:
        super().__init__()
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[:, : width // 2] = (30, 30, 220)
        self.image = VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        self.start: float | None = None
        self.count = 0

    async def recv(self) -> VideoFrame:
        if self.start is None:
            self.start = time.monotonic()
        self.count += 1
        await asyncio.sleep(max(0.0, self.start + self.count / 10 - time.monotonic()))
        frame = self.image.reformat()
        frame.pts = self.count * 9000
        frame.time_base = fractions.Fraction(1, 90_000)
        return frame


class FrameLog(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[int, ...]] = []  # shapes

    async def append_video_frame(
        self, session_id: str, rgb: np.ndarray, timestamp: float | None = None
    ) -> None:
        self.frames.append(rgb.shape)
        await super().append_video_frame(session_id, rgb, timestamp)


async def test_video_call_sends_scaled_frames_with_speech() -> None:
    @asynccontextmanager
    async def factory() -> AsyncIterator[FrameLog]:
        yield FrameLog()

    async with running_server(factory, video_max_side=320) as server:
        async with call(server, video=CameraTrack()) as client:
            await client.expect("session.created")
            start = time.monotonic()
            await client.say(utterance())
            done = (await client.expect("response.done"))["response"]
            transcript = done["output"][0]["content"][0]["transcript"]
            assert "camera frames" in transcript
            seconds = time.monotonic() - start
            await client.hang_up()
        engine = server.engine
        assert isinstance(engine, FrameLog)
        assert engine.frames and all(shape == (180, 320, 3) for shape in engine.frames)
        assert len(engine.frames) <= 2 * seconds + 1  # at most 2 per second
        # each frame stamped with its capture on the audio clock: the camera's media time
        # (10 fps), so stamps are about 0.1 s apart times the frames skipped (exactly, but for
        # the anchor moving to a frame that came sooner: test_video_clock.py)
        turn = engine.conversation().history[0][0]
        stamps = np.array(turn.frame_times, dtype=float)
        assert not np.isnan(stamps).any() and (np.diff(stamps) > 0.45).all()
        tenths = np.diff(stamps) * 10
        assert np.abs(tenths - tenths.round()).max() < 0.3
        audio_end = turn.audio_times[-1] + len(turn.audio[-1]) / 16_000
        assert -1.0 < stamps[0] and stamps[-1] < audio_end + 1.0  # on the same clock as the audio


async def test_two_calls_at_once_are_separate() -> None:
    async with running_server(fake_engine) as server:
        async with call(server) as one, call(server) as two:
            await one.expect("session.created")
            await two.expect("session.created")
            assert len(server.gateway.sessions) == 2
            await one.say(utterance())
            await one.expect("response.done")
            assert not any(e["type"] == "response.created" for e in two.events)
            await one.hang_up()
            await two.hang_up()
        assert server.gateway.sessions == set()
