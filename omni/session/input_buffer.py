"""The input audio buffer: user audio on its way into the engine, and server VAD over it.

Audio arrives as wire bytes (WebSocket appends, decoded here) or as 16 kHz float32 (a WebRTC
track). Without turn detection every sample is uncommitted input and streams straight into
the engine. With server_vad, audio before speech waits in a short ring (for
`prefix_padding_ms`); from the detected start the ring's tail and all further speech stream
into the engine as they arrive (incremental prefill, not a prefill after the turn), and the
VAD's stop is reported so the session can commit and answer at once. With semantic_vad the
VAD's stop is only the eagerness's longest wait: at each pause within speech the prosodic
end-of-turn score of the voice before it sets a shorter wait (turn_detection.py), counted in
received samples of silence (the audio clock, not wall time); speech before then cancels it.

All positions are 16 kHz samples since the session began, so `audio_start_ms`/`audio_end_ms`
count from the first audio the client sent, as OpenAI's do. Audio is processed strictly in
arrival order even when two tasks push (a WebRTC track and data-channel events), since the
VAD's state and the sample clock depend on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np

from omni.engine.api import INPUT_SAMPLE_RATE
from omni.session.config import TurnDetection
from omni.session.end_of_turn import ANALYSED_S, end_probability
from omni.session.engine_queue import EngineQueue, TurnInput
from omni.session.errors import RealtimeError, new_id
from omni.session.turn_detection import wait_ms
from omni.session.vad import WINDOW, SpeechDetector, VadEvent, on_vad_threads
from omni.session.wire_audio import AudioDecoder, AudioFormat

log = logging.getLogger(__name__)


def ms(samples: int) -> int:
    return samples * 1000 // INPUT_SAMPLE_RATE


def samples(ms: int) -> int:
    return ms * INPUT_SAMPLE_RATE // 1000


class SpeechListener(Protocol):
    async def speech_started(self, item_id: str, audio_start_ms: int) -> None: ...

    async def speech_stopped(self, item_id: str, audio_end_ms: int) -> None: ...

    async def speech_paused(self, item_id: str, silence_start_ms: int) -> None:
        """Within speech, `pause_ms` of silence so far; a stop or a resume follows."""

    async def speech_resumed(self, item_id: str) -> None:
        """Speech again after a pause, before any stop."""


# the pause at which semantic_vad scores the turn and a speculative reply starts (the session
# passes settings.speculative_pause_ms, whose default is the same, or this when it is 0: off);
# `omni bench turns` measures semantic_vad with it, and gives the same results at 200 ms
DEFAULT_PAUSE_MS = 100


class InputAudioBuffer:
    def __init__(
        self,
        engine: EngineQueue,
        fmt: AudioFormat,
        max_seconds: float,
        listener: SpeechListener,
        on_error: Callable[[RealtimeError], Awaitable[None]],
        pause_ms: int = DEFAULT_PAUSE_MS,
    ) -> None:
        self.engine = engine
        self.pause_ms = pause_ms  # silence that counts as a pause within speech
        self.listener = listener
        self.on_error = on_error
        self.max_seconds = max_seconds
        self.decoder = AudioDecoder(fmt)
        self.detection: TurnDetection | None = None
        self.speaking = False
        self.speech_item: str | None = None
        self.received = 0  # samples so far: the clock of every position
        self._vad: SpeechDetector | None = None
        self._ring = np.zeros(0, np.float32)  # latest audio before speech (prefix padding)
        self._uncommitted = 0  # samples of audio in the buffer
        self._full_reported = False
        self._lock = asyncio.Lock()  # one push at a time: the VAD runs in a thread
        # semantic_vad: the latest speech (what the end-of-turn scorer reads at a pause) and,
        # after a pause, the sample at which the turn ends unless speech resumes first
        self._voice = np.zeros(0, np.float32)
        self._voice_keep = samples(round(ANALYSED_S * 1000) + pause_ms) + 2 * WINDOW
        self._end_at: int | None = None
        self._end_from = 0  # where that pause's silence began: the turn's audio_end

    async def configure(self, detection: TurnDetection | None) -> None:
        """Turn detection changed: a new detector when its own parameters did."""
        async with self._lock:
            old, self.detection = self.detection, detection
            if detection is None:
                self._vad, self.speaking = None, False
                return
            same = old is not None and (old.threshold, old.silence_duration_ms) == (
                detection.threshold,
                detection.silence_duration_ms,
            )
            if self._vad is None or not same:
                self._vad = await SpeechDetector.create(
                    detection.threshold, detection.silence_duration_ms, self.received, self.pause_ms
                )
                self.speaking = False
                self._end_at, self._voice = None, self._voice[:0]

    async def set_format(self, fmt: AudioFormat) -> None:
        if fmt != self.decoder.format:
            await self.push(self.decoder.flush())
            self.decoder = AudioDecoder(fmt)

    async def append(self, data: bytes) -> None:
        """Wire bytes in the session's input format. An append longer than the buffer can
        ever hold is refused whole, before it is decoded, resampled or run through the VAD."""
        seconds = self.decoder.format.seconds(len(data))
        if seconds > self.max_seconds:
            raise RealtimeError(
                "input_audio_too_long",
                f"this append holds {seconds:.1f} s of audio, over the "
                f"{self.max_seconds:g} s limit (max_buffered_audio_seconds); send smaller appends",
                param="audio",
            )
        await self.push(self.decoder.decode(data, "audio"))

    async def push(self, pcm: np.ndarray) -> None:
        """float32 16 kHz audio."""
        if len(pcm):
            async with self._lock:
                await self._push(pcm)

    async def _push(self, pcm: np.ndarray) -> None:
        base = self.received
        self.received += len(pcm)
        if self._vad is None:
            await self._buffer(pcm, base)
            return
        done = 0
        for event in await self._vad.feed(pcm):
            cut = min(max(event.at - base, done), len(pcm))
            if self._end_at is not None and self._end_at <= base + cut:
                # the turn ended before this event: the VAD's later events are of a reset past
                done = await self._semantic_stop(pcm, base, done)
                break
            await self._route(pcm[done:cut], base + done)
            done = cut
            if event.kind == "start":
                await self._started(event)
            elif event.kind == "stop":
                await self._stopped(event)
            elif self.speech_item is not None and self.speaking:
                if event.kind == "pause":
                    await self.listener.speech_paused(self.speech_item, ms(event.sample))
                    await self._score_pause(event)
                else:
                    self._end_at = None
                    await self.listener.speech_resumed(self.speech_item)
        else:
            if self._end_at is not None and self._end_at <= base + len(pcm):
                done = await self._semantic_stop(pcm, base, done)
        await self._route(pcm[done:], base + done)

    async def _score_pause(self, pause: VadEvent) -> None:
        """semantic_vad: from how the voice before the pause ends, when the turn will end."""
        assert self.detection is not None
        if self.detection.type != "semantic_vad":
            return
        voice = self._voice[: max(len(self._voice) - (pause.at - pause.sample), 0)]
        p = await on_vad_threads(end_probability, voice)
        wait = wait_ms(p, self.detection.eagerness)
        self._end_at = max(pause.sample + samples(wait), pause.at)
        self._end_from = pause.sample
        log.info(
            "semantic_vad pause at %d ms: p(end of turn) %.2f, eagerness %s, wait %d ms",
            ms(pause.sample),
            p,
            self.detection.eagerness,
            wait,
        )

    async def _semantic_stop(self, pcm: np.ndarray, base: int, done: int) -> int:
        """The pause has lasted its wait: speech stopped where the pause began. Returns how
        much of `pcm` (from `base`) is routed."""
        assert self._end_at is not None and self._vad is not None
        cut = self._end_at - base
        await self._route(pcm[done:cut], base + done)
        self._vad.reset()
        self._end_at = None
        await self._stopped(VadEvent("stop", self._end_from, base + cut))
        return cut

    async def end_of_input(self) -> None:
        """Before a manual commit: the resampler's last samples belong to this turn."""
        if self._vad is None:
            await self._buffer(self.decoder.flush(), self.received)

    async def stop_speech(self) -> str | None:
        """The client commits or clears mid-speech: forget it; returns its item id if any."""
        async with self._lock:
            if not self.speaking or self._vad is None:
                return None
            self._vad.reset()
            self.speaking = False
            self._end_at, self._voice = None, self._voice[:0]
            return self.speech_item

    def committed(self) -> None:
        self._uncommitted = 0
        self._full_reported = False

    async def clear(self) -> None:
        """Drop what is not in the engine yet (the engine's side is the session's to undo)."""
        await self.stop_speech()
        self.decoder.flush()
        self._ring = self._ring[:0]
        self.committed()

    async def _route(self, pcm: np.ndarray, at: int) -> None:
        if self.speaking:
            await self._buffer(pcm, at)
            if self.detection is not None and self.detection.type == "semantic_vad":
                self._voice = np.concatenate([self._voice, pcm])[-self._voice_keep :]
        elif len(pcm) and self.detection is not None:
            keep = samples(self.detection.prefix_padding_ms) + 2 * WINDOW
            self._ring = np.concatenate([self._ring, pcm])[-keep:]

    async def _started(self, event: VadEvent) -> None:
        assert self.detection is not None
        self.speaking = True
        self.speech_item = new_id("item")
        start = max(event.sample - samples(self.detection.prefix_padding_ms), 0)
        await self.listener.speech_started(self.speech_item, ms(start))
        ring_start = event.at - len(self._ring)  # the ring ends where the VAD decided
        head, self._ring = self._ring[max(start - ring_start, 0) :], self._ring[:0]
        await self._buffer(head, max(start, ring_start))

    async def _stopped(self, event: VadEvent) -> None:
        self.speaking = False
        self._end_at, self._voice = None, self._voice[:0]
        assert self.speech_item is not None
        await self.listener.speech_stopped(self.speech_item, ms(event.sample))

    async def _buffer(self, pcm: np.ndarray, at: int) -> None:
        """Uncommitted audio (its first sample at `at` on the sample clock) into the engine
        now, within the cap (beyond it, dropped)."""
        if not len(pcm):
            return
        if self._uncommitted + len(pcm) > self.max_seconds * INPUT_SAMPLE_RATE:
            error = RealtimeError(
                "input_audio_buffer_full",
                f"over {self.max_seconds:g} s of uncommitted audio "
                "(max_buffered_audio_seconds); commit or clear the buffer (audio beyond the "
                "limit is dropped)",
            )
        else:
            try:
                self.engine.add(TurnInput("audio", pcm, timestamp=at / INPUT_SAMPLE_RATE))
            except RealtimeError as full:  # the turn's media budget (audio and frames)
                error = full
            else:
                self._uncommitted += len(pcm)
                return
        if not self._full_reported:
            self._full_reported = True
            await self.on_error(error)
