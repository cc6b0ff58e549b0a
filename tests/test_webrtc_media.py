"""The call's media edges without a network: the paced reply track (playout.py) and the
readers of the caller's microphone and camera (inbound.py), fed by fake aiortc tracks."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import time
from typing import Any

import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

from omni.gateway.inbound import MAX_BACKLOG_SAMPLES, MicReader, read_video, to_rgb
from omni.gateway.media_clock import CallClock
from omni.gateway.playout import FRAME, RATE, ReplyAudioTrack
from omni.session.outputs import AudioOut, Played


def tone(ms: int, rate: int = 24_000, hz: float = 440.0, level: int = 8000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * hz * t) * level).astype(np.int16)


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.gaps = 0

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def gap(self) -> None:
        self.gaps += 1

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]


def reply_track() -> tuple[ReplyAudioTrack, Recorder]:
    recorder = Recorder()
    return ReplyAudioTrack(recorder.event, recorder.gap), recorder


async def frames(track: ReplyAudioTrack, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        frame = await track.recv()
        assert (frame.sample_rate, frame.samples, frame.format.name) == (RATE, FRAME, "s16")
        assert frame.layout.name == "mono" and frame.time_base == fractions.Fraction(1, RATE)
        out.append(frame.to_ndarray()[0])
    return out


def loud(pcm: np.ndarray) -> bool:
    return bool(np.abs(pcm).max() > 200)


# -- the reply track


async def test_idle_track_sends_paced_silence() -> None:
    track, recorder = reply_track()
    start = time.monotonic()
    pts = []
    for _ in range(11):
        frame = await track.recv()
        pts.append(frame.pts)
        assert not frame.to_ndarray().any()
    elapsed = time.monotonic() - start
    assert pts == [i * FRAME for i in range(11)]
    assert 0.19 <= elapsed < 0.4  # 10 ticks of 20 ms after the first frame (a busy CI: slack)
    assert recorder.events == [] and recorder.gaps == 0


async def test_reply_plays_whole_at_48k_then_silence() -> None:
    track, recorder = reply_track()
    track.play(AudioOut("resp1", "item1", tone(100), 0))
    track.play(AudioOut("resp1", "item1", tone(100), 2400))
    track.finish("item1")
    out = await frames(track, 14)
    # 200 ms at 24 kHz is 9600 samples at 48 kHz: ten frames of it, then silence
    assert all(loud(f) for f in out[:10])
    assert not any(f.any() for f in out[11:])
    spectrum = np.abs(np.fft.rfft(np.concatenate(out[2:8])))
    assert abs(spectrum.argmax() * RATE / (6 * FRAME) - 440) < 10
    assert recorder.kinds() == ["output_audio_buffer.started", "output_audio_buffer.stopped"]
    assert {e["response_id"] for e in recorder.events} == {"resp1"}
    assert recorder.gaps == 0


async def test_clear_drops_queued_audio_at_once_and_says_what_was_played() -> None:
    track, _ = reply_track()
    track.play(AudioOut("resp1", "item1", tone(1000), 0))
    await frames(track, 5)  # 100 ms played
    played = track.clear()
    assert played == Played("resp1", "item1", 100)
    # the very next frame is silent: nothing queued survives a clear
    assert not (await frames(track, 1))[0].any()
    # audio of the cleared item still in flight is dropped too
    track.play(AudioOut("resp1", "item1", tone(100), 24_000))
    assert not any(f.any() for f in await frames(track, 5))
    assert track.clear() is None
    # the next reply plays normally, and its position counts from its own start
    track.play(AudioOut("resp2", "item2", tone(500), 0))
    await frames(track, 3)
    assert track.clear() == Played("resp2", "item2", 60)


async def test_clear_before_any_sound_reports_zero() -> None:
    track, _ = reply_track()
    track.play(AudioOut("resp1", "item1", tone(200), 0))
    assert track.clear() == Played("resp1", "item1", 0)


async def test_gap_counted_while_reply_is_late_not_after_it_ends() -> None:
    track, recorder = reply_track()
    track.play(AudioOut("resp1", "item1", tone(40), 0))
    await frames(track, 4)  # the 40 ms (minus the resampler's delay) then nothing yet
    assert recorder.gaps >= 2
    track.play(AudioOut("resp1", "item1", tone(40), 960))
    track.finish("item1")
    gaps = recorder.gaps
    await frames(track, 5)
    assert recorder.gaps == gaps
    assert recorder.kinds()[-1] == "output_audio_buffer.stopped"


async def test_stopped_track_ends_the_stream() -> None:
    track, _ = reply_track()
    track.play(AudioOut("resp1", "item1", tone(100), 0))
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


# -- the caller's microphone and camera


class FakeTrack(MediaStreamTrack):
    """Hands out the given frames as fast as asked (or `interval` apart), then ends (once
    `end` is set)."""

    def __init__(self, kind: str, frames: list[Any], interval: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self.frames = list(frames)
        self.interval = interval
        self.read = 0
        self.end = asyncio.Event()
        self.end.set()

    async def recv(self) -> Any:
        if not self.frames:
            await self.end.wait()
            raise MediaStreamError
        if self.interval:
            await asyncio.sleep(self.interval)
        self.read += 1
        return self.frames.pop(0)


def opus_like_frames(seconds: float, hz: float = 300.0) -> list[AudioFrame]:
    """48 kHz stereo s16 20 ms frames, as aiortc's Opus decoder makes them."""
    t = np.arange(int(48_000 * seconds)) / 48_000
    mono = (np.sin(2 * np.pi * hz * t) * 10_000).astype(np.int16)
    out = []
    for i in range(0, len(mono), 960):
        stereo = np.repeat(mono[i : i + 960], 2)[None, :]
        frame = AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = 48_000
        out.append(frame)
    return out


async def test_mic_becomes_16k_mono_float() -> None:
    pushed: list[np.ndarray] = []
    heard = []

    async def push(pcm: np.ndarray) -> None:
        pushed.append(pcm)

    track = FakeTrack("audio", opus_like_frames(1.0), interval=0.001)
    track.end.clear()
    reader = asyncio.create_task(MicReader(track, push, lambda: heard.append(1), CallClock()).run())
    while track.frames:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    track.end.set()
    await reader
    pcm = np.concatenate(pushed)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert len(heard) == 50
    assert 16_000 - 800 <= len(pcm) <= 16_000  # the resampler holds back its last few ms
    spectrum = np.abs(np.fft.rfft(pcm[:8000]))
    assert abs(spectrum.argmax() * 16_000 / 8000 - 300) < 5
    assert 0.25 < np.abs(pcm).max() < 0.35


async def test_mic_reader_keeps_reading_while_the_session_is_slow() -> None:
    pushed: list[int] = []
    release = asyncio.Event()

    async def stuck_push(pcm: np.ndarray) -> None:
        pushed.append(len(pcm))
        await release.wait()

    track = FakeTrack("audio", opus_like_frames(8.0), interval=0.0001)
    track.end.clear()
    reader = asyncio.create_task(MicReader(track, stuck_push, lambda: None, CallClock()).run())
    while track.frames:
        await asyncio.sleep(0.01)
    # every frame left aiortc's queue although the session took only the first batch;
    # what waits is capped at MAX_BACKLOG_SAMPLES
    assert track.read == 400
    release.set()
    while len(pushed) < 2:
        await asyncio.sleep(0.01)
    track.end.set()
    await reader
    assert len(pushed) == 2 and pushed[1] <= MAX_BACKLOG_SAMPLES


def video_frame(width: int, height: int) -> VideoFrame:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (200, 30, 30)
    return VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


async def test_video_sampled_scaled_and_drained() -> None:
    pushed: list[tuple[float, tuple[int, ...]]] = []

    async def push(rgb: np.ndarray, captured: float | None) -> None:
        assert captured is None  # no microphone in this call: no audio clock to map onto
        pushed.append((time.monotonic(), rgb.shape))

    track = FakeTrack("video", [video_frame(1280, 720) for _ in range(45)], interval=1 / 30)
    start = time.monotonic()
    await read_video(track, push, lambda: None, CallClock(), max_fps=2.0, max_side=448)
    seconds = time.monotonic() - start  # 1.5 s, more on a busy machine
    assert track.read == 45  # all read: nothing waits in aiortc's queue
    assert 2 <= len(pushed) <= 2 * seconds + 1
    assert all(shape == (252, 448, 3) for _, shape in pushed)
    times = [t for t, _ in pushed]
    assert all(b - a >= 0.5 for a, b in itertools.pairwise(times))


def test_to_rgb_scales_down_never_up() -> None:
    small = to_rgb(video_frame(320, 240), 448)
    assert small.shape == (240, 320, 3) and small.dtype == np.uint8
    assert tuple(small[120, 10]) == pytest.approx((200, 30, 30), abs=12)
    assert to_rgb(video_frame(720, 1280), 448).shape == (448, 252, 3)
