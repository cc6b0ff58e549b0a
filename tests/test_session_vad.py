"""Silero speech detection on synthetic speech: where turns start and stop, in any chunking."""

from __future__ import annotations

import numpy as np
import pytest
from realtime_helpers import speech

from omni.session.vad import WINDOW, SpeechDetector


def spoken(text: str) -> np.ndarray:
    return np.frombuffer(speech(text, 16000), dtype="<i2").astype(np.float32) / 32768


async def detect(audio: np.ndarray, chunk: int, position: int = 0) -> list:
    detector = await SpeechDetector.create(0.5, 500, position)
    events = []
    for i in range(0, len(audio), chunk):
        events += await detector.feed(audio[i : i + chunk])
    return events


@pytest.mark.parametrize("chunk", [160, 1600, 7000])
async def test_one_utterance_one_start_and_stop(chunk: int) -> None:
    words = spoken("What is the capital of France?")
    audio = np.concatenate([np.zeros(8000, np.float32), words, np.zeros(16000, np.float32)])
    events = await detect(audio, chunk)
    assert [e.kind for e in events] == ["start", "stop"]
    start, stop = events
    assert abs(start.sample - 8000) < 0.15 * 16000  # within 150 ms of the first word
    assert abs(stop.sample - (8000 + len(words))) < 0.3 * 16000
    # the stop is decided after silence_duration_ms of silence, at a window boundary
    assert stop.at - stop.sample >= 500 * 16 and stop.at % WINDOW == 0
    assert start.at > start.sample


async def test_positions_continue_from_the_given_offset() -> None:
    audio = np.concatenate(
        [np.zeros(8000, np.float32), spoken("hello there"), np.zeros(16000, np.float32)]
    )
    plain = await detect(audio, 1600)
    shifted = await detect(audio, 1600, position=5 * WINDOW)
    assert [e.sample + 5 * WINDOW for e in plain] == [e.sample for e in shifted]


async def test_silence_and_reset() -> None:
    detector = await SpeechDetector.create(0.5, 500)
    assert await detector.feed(np.zeros(32000, np.float32)) == []
    events = await detector.feed(spoken("hello there"))
    assert [e.kind for e in events] == ["start"] and detector.speaking
    detector.reset()
    assert not detector.speaking
    assert await detector.feed(np.zeros(16000, np.float32)) == []  # no stop for a forgotten start


async def test_pauses_and_resumes_within_a_turn() -> None:
    """pause_ms of silence inside speech is a pause; speech after it, before the stop, a
    resume; the stop still waits for silence_duration_ms. Without pause_ms: neither."""
    first, second = spoken("I was thinking that"), spoken("we could go tomorrow")
    gap = np.zeros(int(0.4 * 16000), np.float32)
    audio = np.concatenate([np.zeros(8000, np.float32), first, gap, second, np.zeros(16000, np.float32)])

    async def kinds_and_events(pause_ms: int | None) -> list:
        detector = await SpeechDetector.create(0.5, 700, pause_ms=pause_ms)
        events = []
        for i in range(0, len(audio), 1600):
            events += await detector.feed(audio[i : i + 1600])
        return events

    events = await kinds_and_events(200)
    assert [e.kind for e in events] == ["start", "pause", "resume", "pause", "stop"]
    _, pause, resume, last_pause, stop = events
    first_end = 8000 + len(first)
    assert abs(pause.sample - first_end) < 0.3 * 16000
    assert pause.at - pause.sample >= 200 * 16 and pause.at < resume.at
    assert abs(resume.sample - (first_end + len(gap))) < 0.3 * 16000
    assert last_pause.sample == stop.sample  # the stop's silence is the last pause's
    assert stop.at - last_pause.at >= 500 * 16 - WINDOW
    assert [e.kind for e in await kinds_and_events(None)] == ["start", "stop"]
