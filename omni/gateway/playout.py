"""The assistant's voice on a call: a paced audio track that is also the session's `Playout`.

aiortc's sender pulls `recv()` in a loop, so the track sets the pace, as aiortc's own
AudioStreamTrack does: one 20 ms frame of 48 kHz mono per tick, reply audio while there is
some and silence otherwise, so the RTP stream never pauses and the caller's jitter buffer
stays settled between turns.

Reply audio (24 kHz int16, as the engine makes it) is resampled per reply item with soxr
(flushed when the item's audio is done) and queued. `clear()` (barge-in) empties the queue
at once, so the next frame, at most 20 ms later, is silence, and reports how far the item
got, counted in samples handed to the encoder, so the session truncates the reply to that.
The track also says when it starts and stops playing a response, as OpenAI's WebRTC
`output_audio_buffer.started` / `.stopped` events.

The queue is bounded: the engine makes audio faster than real time, so a long reply piles
up ahead of the clock. Past `max_queued_seconds` the newest audio is dropped (what is queued
still plays, the caller hears the reply up to there) and one `playout_full` error event per
item says so; truncation stays exact, since it counts only samples actually played.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from omni.engine.api import OUTPUT_SAMPLE_RATE
from omni.engine.resample import StreamResampler
from omni.session.errors import RealtimeError, new_id
from omni.session.outputs import AudioOut, Played

RATE = 48_000  # Opus's rate: the encoder takes it without resampling again
FRAME = RATE // 50  # 20 ms, one Opus frame
UPSAMPLE = RATE // OUTPUT_SAMPLE_RATE
MAX_LAG_S = 0.1  # further behind than this (a stalled event loop): restart the clock, no burst
TIME_BASE = fractions.Fraction(1, RATE)


@dataclass(eq=False)
class _Item:
    """One reply item's audio on its way out."""

    response_id: str
    item_id: str
    offset: int  # 48 kHz samples of the item before its first queued sample
    resampler: StreamResampler
    played: int = 0  # 48 kHz samples handed to the encoder
    started: bool = False
    done: bool = False  # all of its audio is queued

    def audio_end_ms(self) -> int:
        return (self.offset + self.played) * 1000 // RATE


class ReplyAudioTrack(MediaStreamTrack):
    """Outbound audio for one call; `play`/`finish` from the session's outbox, `clear` on barge-in.

    :param on_event: called with each `output_audio_buffer.*` server event to send.
    :param on_gap: called for each silent frame sent while a reply was still being generated.
    """

    kind = "audio"

    def __init__(
        self,
        on_event: Callable[[dict[str, Any]], None],
        on_gap: Callable[[], None] = lambda: None,
        max_queued_seconds: float = 120.0,
    ) -> None:
        super().__init__()
        self._on_event = on_event
        self._on_gap = on_gap
        self._chunks: deque[tuple[_Item, np.ndarray]] = deque()
        self._queued = 0  # 48 kHz samples in _chunks
        self.max_queued = int(max_queued_seconds * RATE)
        self._overflowed: str | None = None  # the item whose audio was cut, said once
        self._writing: _Item | None = None  # the item new audio belongs to
        self._playing: _Item | None = None  # started and not yet played out
        self._cleared: str | None = None  # audio still in flight for this item is dropped
        self._start: float | None = None
        self._pts = 0

    # -- filled from the session's outbox

    def play(self, out: AudioOut) -> None:
        if out.item_id == self._cleared or self.readyState != "live":
            return
        item = self._writing
        if item is None or item.item_id != out.item_id:
            if item is not None:
                self._flush(item)
            item = self._writing = _Item(
                out.response_id,
                out.item_id,
                out.first_sample * UPSAMPLE,
                StreamResampler(OUTPUT_SAMPLE_RATE, RATE, np.int16),
            )
        self._queue(item, item.resampler.process(out.pcm))

    def finish(self, item_id: str) -> None:
        """The item's audio is complete (`response.output_audio.done`)."""
        if self._writing is not None and self._writing.item_id == item_id:
            self._flush(self._writing)

    def clear(self) -> Played | None:
        """Drop all queued audio now; how far the item being played got (None: idle)."""
        item = self._playing or (self._chunks[0][0] if self._chunks else None)
        if self._writing is not None:
            self._cleared = self._writing.item_id
        self._chunks.clear()
        self._queued = 0
        self._writing = self._playing = None
        if item is None:
            return None
        return Played(item.response_id, item.item_id, item.audio_end_ms())

    def _flush(self, item: _Item) -> None:
        self._queue(item, item.resampler.process(np.zeros(0, np.int16), last=True))
        item.done = True
        self._writing = None

    def _queue(self, item: _Item, pcm: np.ndarray) -> None:
        if not len(pcm):
            return
        if self._queued + len(pcm) > self.max_queued:
            if self._overflowed != item.item_id:
                self._overflowed = item.item_id
                limit = self.max_queued / RATE
                message = f"over {limit:g} s of reply audio is queued to play; the rest is dropped"
                error = RealtimeError("playout_full", message, type="server_error")
                self._on_event(error.to_event())
            return
        self._queued += len(pcm)
        self._chunks.append((item, pcm))

    # -- pulled by aiortc's sender

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._next_tick()
        frame = AudioFrame.from_ndarray(self._take()[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        return frame

    def stop(self) -> None:
        self._chunks.clear()
        self._queued = 0
        self._writing = self._playing = None
        super().stop()

    async def _next_tick(self) -> None:
        # monotonic, not wall-clock time: a clock step must not stall or rush the stream
        now = time.monotonic()
        if self._start is None:
            self._start = now
            return
        self._pts += FRAME
        wait = self._start + self._pts / RATE - now
        if wait > 0:
            await asyncio.sleep(wait)
        elif wait < -MAX_LAG_S:
            self._start = now - self._pts / RATE

    def _take(self) -> np.ndarray:
        out = np.zeros(FRAME, np.int16)
        filled = 0
        while filled < FRAME and self._chunks:
            item, pcm = self._chunks[0]
            if item is not self._playing:
                self._stopped()
                self._playing = item
            if not item.started:
                item.started = True
                self._emit("output_audio_buffer.started", item)
            n = min(FRAME - filled, len(pcm))
            out[filled : filled + n] = pcm[:n]
            filled += n
            self._queued -= n
            item.played += n
            if n == len(pcm):
                self._chunks.popleft()
            else:
                self._chunks[0] = (item, pcm[n:])
        playing = self._playing
        if playing is not None and not self._chunks:
            if playing.done:
                self._stopped()
            elif filled < FRAME:
                self._on_gap()  # the reply is still coming but none of it is here yet
        return out

    def _stopped(self) -> None:
        if self._playing is not None:
            self._emit("output_audio_buffer.stopped", self._playing)
            self._playing = None

    def _emit(self, kind: str, item: _Item) -> None:
        self._on_event({"type": kind, "event_id": new_id("event"), "response_id": item.response_id})
