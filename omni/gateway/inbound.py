"""What the caller sends: their microphone into the session as 16 kHz mono, their camera or
screen as a few scaled RGB frames per second.

aiortc puts every decoded frame of an accepted track in an unbounded queue (aiortc#554), so
each track here is read to its end, whatever happens to a frame, and what is not wanted
(video between samples) is read and dropped. The microphone is read by one loop and handed to the session by another, so a
slow moment in the session (its VAD runs in threads) never leaves frames piling up inside
aiortc; the backlog between the two is capped instead, in one visible place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

from omni.engine.api import INPUT_SAMPLE_RATE
from omni.engine.resample import StreamResampler
from omni.gateway.media_clock import CallClock

log = logging.getLogger(__name__)

Push = Callable[[np.ndarray], Awaitable[None]]
PushFrame = Callable[[np.ndarray, float | None], Awaitable[None]]  # RGB, capture time
MAX_BACKLOG_SAMPLES = 5 * INPUT_SAMPLE_RATE
# the session enforces the same frame cap on its own clock; a little slack keeps the two
# clocks from disagreeing about a frame that is exactly on time
FRAME_SLACK_S = 0.01


class MicReader:
    """Reads one audio track into `push` as float32 16 kHz mono; `heard` on every frame;
    `clock` is told of each one (the session's audio clock, for the camera's frames)."""

    def __init__(
        self, track: MediaStreamTrack, push: Push, heard: Callable[[], None], clock: CallClock
    ) -> None:
        self.track = track
        self.push = push
        self.heard = heard
        self.clock = clock
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._ready = asyncio.Event()
        self._resampler: StreamResampler | None = None
        self._dropping = False

    async def run(self) -> None:
        pusher = asyncio.create_task(self._push_loop())
        try:
            while True:
                try:
                    frame = await self.track.recv()
                except MediaStreamError:
                    return
                self.heard()
                self.clock.audio_frame(frame)  # type: ignore[arg-type]
                try:
                    self._add(self._to_16k(frame))  # type: ignore[arg-type]
                except Exception:  # one odd frame must not stop the reading
                    log.exception("caller audio %s: dropped a frame", self.track.id)
        finally:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)

    def _to_16k(self, frame: AudioFrame) -> np.ndarray:
        pcm = frame.to_ndarray()
        channels = len(frame.layout.channels)
        # packed frames interleave channels in one row; planar ones have a row per channel
        pcm = pcm.mean(axis=0) if frame.format.is_planar else pcm.reshape(-1, channels).mean(axis=1)
        if frame.format.name.startswith("s16"):
            pcm = pcm / 32768.0
        if self._resampler is None or self._resampler.in_rate != frame.sample_rate:
            self._resampler = StreamResampler(frame.sample_rate, INPUT_SAMPLE_RATE)
        return self._resampler.process(pcm.astype(np.float32))

    def _add(self, pcm: np.ndarray) -> None:
        if not len(pcm):
            return
        self._pending.append(pcm)
        self._pending_samples += len(pcm)
        while self._pending_samples > MAX_BACKLOG_SAMPLES:
            self._pending_samples -= len(self._pending.pop(0))
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "caller audio %s: the session is behind; dropping the oldest audio",
                    self.track.id,
                )
        self._ready.set()

    async def _push_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            pcm = np.concatenate(self._pending)
            self._pending.clear()
            self._pending_samples = 0
            self._dropping = False
            await self.push(pcm)


async def read_video(
    track: MediaStreamTrack,
    push: PushFrame,
    heard: Callable[[], None],
    clock: CallClock,
    max_fps: float,
    max_side: int,
) -> None:
    """Reads one camera or screen track; at most `max_fps` frames go to `push`, as RGB whose
    longest side is at most `max_side`, each with its capture time on the audio clock."""
    interval = 1.0 / max_fps + FRAME_SLACK_S
    next_at = 0.0
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        heard()
        captured = clock.video_time(frame)  # type: ignore[arg-type]
        if time.monotonic() < next_at:
            continue
        try:
            rgb = await asyncio.to_thread(to_rgb, frame, max_side)  # type: ignore[arg-type]
        except Exception:  # one odd frame must not stop the reading
            log.exception("caller video %s: dropped a frame", track.id)
            continue
        # spaced from the push, not the arrival: the session checks the rate at the push
        next_at = time.monotonic() + interval
        await push(rgb, captured)


def to_rgb(frame: VideoFrame, max_side: int) -> np.ndarray:
    """The frame as uint8 HxWx3, scaled down (never up) to fit `max_side`."""
    scale = min(1.0, max_side / max(frame.width, frame.height))
    width = max(1, round(frame.width * scale))
    height = max(1, round(frame.height * scale))
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
