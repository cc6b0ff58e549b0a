"""Voice activity detection for server_vad turn-taking: Silero VAD from the silero-vad package.

Silero is small (2 MB), runs on CPU in about a millisecond per 32 ms window, and is what the
peers use (Pipecat, FastRTC, LiveKit). The package's own `VADIterator` does the hysteresis
(start at `threshold`, stop after `silence_duration_ms` below `threshold - 0.15`); this
module feeds it exact 512-sample windows and reports where speech started and ended in
session sample positions, plus where each decision was made, so the session can route the
audio before and after it.

Model calls block, so they run on a small shared pool of threads, each limited to one torch
thread: Silero's tiny ops get slower, not faster, when spread over cores (about 2 ms per
window on one thread here, 20-35 ms on two), and torch's OpenMP thread count is per thread,
so this leaves the rest of the process (an in-process engine) alone.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from omni.engine.api import INPUT_SAMPLE_RATE

# silero_vad.model calls torch.set_num_threads(1) at import; keep the process's setting
_threads = torch.get_num_threads()
from silero_vad import VADIterator, load_silero_vad  # noqa: E402

torch.set_num_threads(_threads)
# load_silero_vad() uses two deprecated calls; said once per session it would flood the log
warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
warnings.filterwarnings("ignore", r"path is deprecated", DeprecationWarning, "silero_vad")

WINDOW = 512  # samples at 16 kHz: the only window size Silero v5+ takes at this rate

_executor = ThreadPoolExecutor(
    max_workers=min(4, os.cpu_count() or 1),
    thread_name_prefix="silero-vad",
    initializer=torch.set_num_threads,
    initargs=(1,),
)


T = TypeVar("T")


async def on_vad_threads(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on the VAD's threads (for the session's other small per-window audio work)."""
    return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)


@dataclass(frozen=True)
class VadEvent:
    """start / stop: speech began / ended (the stop after `silence_duration_ms` of silence).
    pause: within speech, `pause_ms` of silence so far (a stop may follow); resume: speech
    again after a pause, before any stop. A pause's `sample` is where its silence began."""

    kind: Literal["start", "stop", "pause", "resume"]
    sample: int  # where speech started, ended or paused (16 kHz samples since the session began)
    at: int  # the sample position at which the decision was made (end of the deciding window)


class SpeechDetector:
    """Streaming speech start/stop over float32 16 kHz audio of any chunk size.

    Build with `await SpeechDetector.create(...)` and feed with `await detector.feed(pcm)`;
    both run on the VAD threads. A detector's calls must not overlap (the session awaits each).
    """

    @classmethod
    async def create(
        cls,
        threshold: float,
        silence_duration_ms: int,
        position: int = 0,
        pause_ms: int | None = None,
    ) -> SpeechDetector:
        return await on_vad_threads(cls, threshold, silence_duration_ms, position, pause_ms)

    async def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        return await on_vad_threads(self.process, pcm)

    def __init__(
        self,
        threshold: float,
        silence_duration_ms: int,
        position: int = 0,
        pause_ms: int | None = None,
    ) -> None:
        """`position`: the session sample position of the first sample it will be fed;
        `pause_ms`: report pauses this long (None: no pause or resume events)."""
        self._iterator = VADIterator(
            load_silero_vad(),
            threshold=threshold,
            sampling_rate=INPUT_SAMPLE_RATE,
            min_silence_duration_ms=silence_duration_ms,
            speech_pad_ms=0,  # the session applies prefix_padding_ms itself
        )
        self._iterator.current_sample = position
        self._pending = np.zeros(0, np.float32)
        self._consumed = position  # session position of the next window
        self._pause = None if pause_ms is None else pause_ms * INPUT_SAMPLE_RATE // 1000
        self._paused = False

    @property
    def speaking(self) -> bool:
        return bool(self._iterator.triggered)

    def process(self, pcm: np.ndarray) -> list[VadEvent]:
        """Feed audio; return the starts and stops decided within it, in order."""
        audio = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        events: list[VadEvent] = []
        whole = len(audio) - len(audio) % WINDOW
        with torch.inference_mode():
            for begin in range(0, whole, WINDOW):
                result = self._iterator(
                    torch.from_numpy(np.ascontiguousarray(audio[begin : begin + WINDOW]))
                )
                self._consumed += WINDOW
                if result:
                    self._paused = False
                    kind: Literal["start", "stop"] = "start" if "start" in result else "stop"
                    events.append(
                        VadEvent(
                            kind, int(result[kind if kind == "start" else "end"]), self._consumed
                        )
                    )
                elif self._pause is not None:
                    events += self._pause_events()
        self._pending = audio[whole:].copy()
        return events

    def _pause_events(self) -> list[VadEvent]:
        """From the iterator's candidate end (`temp_end`: where silence began, 0 when speech
        came back): a pause once it is `pause_ms` old, a resume when speech returns."""
        silence_from = self._iterator.temp_end
        if not self._paused and self.speaking and silence_from:
            if self._consumed - silence_from >= self._pause:
                self._paused = True
                return [VadEvent("pause", int(silence_from) - WINDOW, self._consumed)]
        elif self._paused and not silence_from:
            self._paused = False
            return [VadEvent("resume", self._consumed - WINDOW, self._consumed)]
        return []

    def reset(self) -> None:
        """Forget speech in progress (the buffer was cleared); positions keep counting."""
        self._iterator.reset_states()
        self._paused = False
        # VADIterator restarts its clock at zero; keep session positions continuous
        self._iterator.current_sample = self._consumed
