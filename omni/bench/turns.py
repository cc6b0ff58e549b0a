"""`omni bench turns`: when does each turn-detection mode end a spoken turn?

Spoken turns made with espeak-ng, each sentence twice: once with a pause in the middle (its
first half, ending with a comma so it is spoken as going on, then 0.6-1.5 s of silence, then
the rest) and once ending cleanly, followed by silence. Each turn runs through the session's
real InputAudioBuffer and Silero VAD (no model: the buffer's engine calls are never run), in
100 ms pieces as a microphone sends them, for server_vad (500 ms) and semantic_vad at each
eagerness. Per mode: the false end-of-turn rate (a paused turn ended before its last
words) and, for clean ends, the time from the end of speech to the turn's end (audio clock,
p50 / p95). Nothing here is timed by the wall clock, so the numbers are the same on any
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import soxr

from omni.bench.calls import speech
from omni.engine.api import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, Engine
from omni.session.config import TurnDetection
from omni.session.engine_queue import EngineQueue
from omni.session.errors import RealtimeError
from omni.session.input_buffer import InputAudioBuffer, samples
from omni.session.turn_detection import Eagerness, max_wait_ms
from omni.session.wire_audio import AudioFormat

# (first half, rest): the first half alone is where a speaker pauses to think. The first 12
# are those end_of_turn.py's weights were fitted on; the last 6 were not (held out).
SENTENCES = (
    ("I was thinking about going", "to the market tomorrow morning."),
    ("My brother and I", "went hiking in the mountains."),
    ("The meeting on Friday", "has been moved to next week."),
    ("If you have a moment", "I would like to ask you something."),
    ("We bought a new car", "because the old one broke down."),
    ("She said that the train", "would be late again tonight."),
    ("Please remind me", "to call the doctor at noon."),
    ("After dinner we usually", "take a walk along the river."),
    ("The report you sent me", "was missing the last page."),
    ("I think the best option", "is to wait until spring."),
    ("Our neighbours have a dog", "that barks all night long."),
    ("Could you tell me", "what the weather is like today?"),
    ("When I was a child", "we lived near the sea."),
    ("The children played outside", "until it got dark."),
    ("I have been reading a book", "about the history of China."),
    ("Tomorrow we are going", "to visit my grandmother."),
    ("The shop on the corner", "sells fresh bread every day."),
    ("He told me that the game", "was cancelled because of rain."),
)
FITTED = 12  # SENTENCES[:FITTED] were used to fit the scorer
GAPS_S = (0.6, 0.9, 1.2, 1.5)  # mid-sentence pauses, in turn
LEAD_S = 0.3  # silence before the caller speaks
PIECE = INPUT_SAMPLE_RATE // 10  # 100 ms
AUDIBLE = 1e-3  # sample magnitude: below it espeak-ng's output is its padding silence
MODES: tuple[tuple[str, Eagerness | None], ...] = (
    ("server_vad", None),
    ("semantic_vad low", "low"),
    ("semantic_vad medium", "medium"),
    ("semantic_vad high", "high"),
)


def spoken(text: str) -> np.ndarray:
    """`text` by espeak-ng, float32 at 16 kHz (the session's input rate), without the
    silence espeak-ng ends with: the end of speech is the last audible sample."""
    audio = soxr.resample(
        speech(text).astype(np.float32) / 32767, OUTPUT_SAMPLE_RATE, INPUT_SAMPLE_RATE
    )
    audible = np.flatnonzero(np.abs(audio) > AUDIBLE)
    return audio[: audible[-1] + 1] if len(audible) else audio


@dataclass(frozen=True)
class Turn:
    text: str
    held_out: bool  # its sentence was not used to fit the scorer
    audio: np.ndarray  # lead silence and speech, no trailing silence
    pause: tuple[int, int] | None  # the mid-sentence pause's samples [from, to), if any


def make_turns() -> list[Turn]:
    lead = np.zeros(int(LEAD_S * INPUT_SAMPLE_RATE), np.float32)
    turns = []
    for i, (first, rest) in enumerate(SENTENCES):
        head, tail = spoken(first + ","), spoken(rest)
        gap = np.zeros(int(GAPS_S[i % len(GAPS_S)] * INPUT_SAMPLE_RATE), np.float32)
        begin = len(lead) + len(head)
        turns.append(
            Turn(
                f"{first}, ... {rest}",
                i >= FITTED,
                np.concatenate([lead, head, gap, tail]),
                (begin, begin + len(gap)),
            )
        )
        whole = np.concatenate([lead, spoken(f"{first} {rest}")])
        turns.append(Turn(f"{first} {rest}", i >= FITTED, whole, None))
    return turns


class TurnEvents:
    """The buffer's listener: what it reported, each with the sample position it was
    reported at (how much audio had been pushed)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.audio_end_ms: int | None = None  # of the first stop
        self.received = 0

    @property
    def stopped_at(self) -> int | None:
        return next((at for kind, at in self.events if kind == "stopped"), None)

    async def speech_started(self, item_id: str, audio_start_ms: int) -> None:
        self.events.append(("started", self.received))

    async def speech_stopped(self, item_id: str, audio_end_ms: int) -> None:
        if self.stopped_at is None:
            self.audio_end_ms = audio_end_ms
        self.events.append(("stopped", self.received))

    async def speech_paused(self, item_id: str, silence_start_ms: int) -> None:
        self.events.append(("paused", self.received))

    async def speech_resumed(self, item_id: str) -> None:
        self.events.append(("resumed", self.received))


def detection(eagerness: Eagerness | None) -> TurnDetection:
    if eagerness is None:
        return TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    return TurnDetection(
        threshold=0.5,
        prefix_padding_ms=300,
        silence_duration_ms=max_wait_ms(eagerness),
        type="semantic_vad",
        eagerness=eagerness,
    )


async def run_turn(
    audio: np.ndarray, turn_detection: TurnDetection, until_stop: bool
) -> TurnEvents:
    """`audio` through a fresh InputAudioBuffer in 100 ms pieces, then silence for the mode's
    longest wait and a second; `until_stop`: only until the first turn end."""

    async def refuse(error: RealtimeError) -> None:
        raise error

    # the engine is never called: its queued calls are not run, only counted against caps
    engine = EngineQueue(
        cast(Engine, None), "bench", refuse, max_calls=1 << 30, max_turn_bytes=1 << 40
    )
    events = TurnEvents()
    buffer = InputAudioBuffer(engine, AudioFormat("pcm16", INPUT_SAMPLE_RATE), 60.0, events, refuse)
    await buffer.configure(turn_detection)
    trailing = samples(turn_detection.silence_duration_ms + 1000)
    audio = np.concatenate([audio, np.zeros(trailing, np.float32)])
    for at in range(0, len(audio), PIECE):
        events.received = at + len(audio[at : at + PIECE])
        await buffer.push(audio[at : at + PIECE])
        if until_stop and events.stopped_at is not None:
            break
    return events


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass(frozen=True)
class ModeRow:
    mode: str
    sentences: str  # "fitted" or "held out"
    paused_turns: int
    false_ends: int
    false_end_rate: float
    clean_turns: int
    never_ended: int
    end_ms_p50: float | None
    end_ms_p95: float | None


async def measure_mode(
    name: str, eagerness: Eagerness | None, sentences: str, turns: list[Turn]
) -> ModeRow:
    false_ends, paused, waits, never = 0, 0, [], 0
    for turn in turns:
        ended = (await run_turn(turn.audio, detection(eagerness), until_stop=True)).stopped_at
        if turn.pause is not None:
            paused += 1
            false_ends += ended is not None and ended < len(turn.audio)  # before the words
        elif ended is None:
            never += 1
        else:
            waits.append((ended - len(turn.audio)) * 1000 / INPUT_SAMPLE_RATE)
    return ModeRow(
        mode=name,
        sentences=sentences,
        paused_turns=paused,
        false_ends=false_ends,
        false_end_rate=false_ends / paused if paused else 0.0,
        clean_turns=len(turns) - paused,
        never_ended=never,
        end_ms_p50=percentile(waits, 50),
        end_ms_p95=percentile(waits, 95),
    )


def table(rows: list[ModeRow]) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        "| mode | sentences | false end of turn | end of speech to turn end, ms (p50 / p95) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.mode} | {row.sentences} "
            f"| {row.false_ends}/{row.paused_turns} ({row.false_end_rate:.0%}) "
            f"| {num(row.end_ms_p50)} / {num(row.end_ms_p95)} |"
        )
    return "\n".join(lines)


async def run_bench() -> list[ModeRow]:
    turns = await asyncio.to_thread(make_turns)
    rows = []
    for name, eagerness in MODES:
        for sentences, held_out in (("fitted", False), ("held out", True)):
            subset = [turn for turn in turns if turn.held_out == held_out]
            rows.append(await measure_mode(name, eagerness, sentences, subset))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = asyncio.run(run_bench())
    print(table(rows))
    if args.json:
        result: dict[str, Any] = {
            "sentences": len(SENTENCES),
            "fitted": FITTED,
            "modes": [asdict(row) for row in rows],
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def add_turns_command(actions: argparse._SubParsersAction) -> None:
    bench = actions.add_parser(
        "turns",
        help="false end-of-turn rate and end-of-turn delay per turn-detection mode "
        "(espeak-ng turns through the real input buffer and Silero VAD)",
    )
    bench.add_argument("--json", help="write the per-mode rows here")
    bench.set_defaults(run=run)
