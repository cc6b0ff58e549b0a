"""`omni bench long-call`: one long video call through the real engine, minute by minute.

One session on the engine's real worker processes (thinker, talker, vocoder) lives through a
call of `--minutes M`: every `--turn-seconds` the caller speaks for `--speech-seconds` with
the camera on (16 kHz audio in 100 ms pieces, frames at `--fps`, each stamped with its
capture time on the caller's audio clock, give or take `--frame-jitter-ms`), the model
replies (greedy, held to a fixed length), and every `--barge-in-every`-th reply is
interrupted at its first audio and truncated to what was heard. Between turns the caller is
silent, and silence never reaches the model (the session's VAD keeps it out), so nothing is
sent; the audio clock still moves on, as a microphone's does.

The call's clock is simulated: media goes in as fast as the engine takes it and replies are
not paced to playback, so a 30-minute call takes far less than 30 minutes on a GPU (and on
the tiny checkpoint, a few minutes on a CPU). The minutes in the table are call minutes.

Per call minute: the thinker's context (tokens and KV bytes, from the thinker's heartbeats,
read after each turn), the thinker's time per decode step (the gaps between text deltas),
end of turn to first audio, and the RSS of the engine's processes. The summary compares the
minute the context first reached the budget (90 % of it: eviction keeps it just under) with
the last minute; the goals are every turn answered, the context never above the budget, and
flat from then on. `frame_audio_offset_ms_max` is the worst distance between a frame's
capture time and the audio time the model placed it at.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omni.engine.api import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    AudioChunk,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
    TextDelta,
)
from omni.engine.engine import EngineConfig, OmniEngine, running_engine

SESSION = "long-call"
PIECE_S = 0.1  # caller audio goes in as a microphone track delivers it, 100 ms at a time
REACHED = 0.9  # the context "reached" the budget at this share of it
HEARTBEAT_WAIT_S = 10.0  # workers beat every second; a fresh beat follows each turn


@dataclass(frozen=True)
class CallPlan:
    minutes: float = 30.0
    turn_seconds: float = 20.0
    speech_seconds: float = 4.0
    barge_in_every: int = 3
    fps: float = 2.0
    frame_width: int = 320
    frame_height: int = 240
    frame_jitter_ms: float = 20.0
    reply_text_tokens: int = 16
    reply_codec_tokens: int = 48
    seed: int = 0

    @property
    def turns(self) -> int:
        return max(1, int(self.minutes * 60 // self.turn_seconds))


@dataclass
class TurnSample:
    """One turn as the bench saw it, with the engine's state right after."""

    turn: int
    minute: int  # the call minute the turn started in (0-based)
    answered: bool  # reply audio came back
    barged_in: bool
    context_tokens: int
    kv_bytes: int
    step_ms: float | None  # thinker, per decode step
    first_audio_ms: float | None  # end of the caller's turn to the reply's first audio
    rss_mb: float | None
    frame_offset_ms: float | None  # worst frame-to-audio offset in this turn


def rss_mb() -> float | None:
    """Resident memory of this process and its children (the workers), from /proc."""
    pids = [os.getpid(), *(child.pid for child in multiprocessing.active_children())]
    try:
        pages = sum(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) for pid in pids)
    except (OSError, IndexError, ValueError):  # not Linux, or a child just ended
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class LongCall:
    """The caller's side of the call: its media, turns and barge-ins on one engine session."""

    def __init__(self, engine: OmniEngine, plan: CallPlan) -> None:
        self.engine = engine
        self.plan = plan
        self.rng = np.random.default_rng(plan.seed)
        shape = (plan.frame_height, plan.frame_width, 3)
        self.frames = [self.rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(4)]
        self.audio_s = 0.0  # the caller's audio clock: seconds of audio given to the model
        self.sent_frames = 0
        self.options = ReplyOptions(
            greedy=True,
            max_text_tokens=plan.reply_text_tokens,
            min_text_tokens=plan.reply_text_tokens,
            max_codec_tokens=plan.reply_codec_tokens,
            min_codec_tokens=plan.reply_codec_tokens,
        )

    async def speak(self, index: int) -> None:
        """Turn `index`'s speech with the camera on, every piece and frame stamped with its
        time on the caller's audio clock (a frame's capture time, with jitter)."""
        piece = int(PIECE_S * INPUT_SAMPLE_RATE)
        pieces = round(self.plan.speech_seconds / PIECE_S)
        self.audio_s = index * self.plan.turn_seconds  # the silence since the last turn
        next_frame_s = self.audio_s
        jitter_s = self.plan.frame_jitter_ms / 1000
        for _ in range(pieces):
            while next_frame_s < self.audio_s + PIECE_S - 1e-9:
                frame = self.frames[self.sent_frames % len(self.frames)]
                captured = max(0.0, next_frame_s + self.rng.uniform(-jitter_s, jitter_s))
                await self.engine.append_video_frame(SESSION, frame, timestamp=captured)
                self.sent_frames += 1
                next_frame_s += 1 / self.plan.fps
            speech = (0.1 * self.rng.standard_normal(piece)).astype(np.float32)
            await self.engine.append_audio(SESSION, speech, timestamp=self.audio_s)
            self.audio_s += PIECE_S

    async def reply(self, barge_in: bool) -> tuple[ReplyDone, float | None, bool]:
        """(the reply's end, thinker ms per decode step, whether audio came back)."""
        deltas: list[tuple[float, int]] = []  # (arrival, tokens)
        audio_samples = 0
        done: ReplyDone | None = None
        async for event in self.engine.respond(SESSION, self.options):
            if isinstance(event, TextDelta):
                deltas.append((time.perf_counter(), len(event.token_ids)))
            elif isinstance(event, AudioChunk):
                if barge_in and not audio_samples:
                    await self.engine.cancel(SESSION)  # the caller speaks over the reply
                audio_samples += len(event.pcm)
            elif isinstance(event, ReplyDone):
                done = event
        assert done is not None
        if barge_in and audio_samples:
            heard_ms = audio_samples * 1000 // OUTPUT_SAMPLE_RATE // 2
            await self.engine.truncate_reply(SESSION, heard_ms)
        tokens = sum(n for _, n in deltas)
        step_ms = None
        if len(deltas) > 1 and tokens > deltas[0][1]:
            step_ms = (deltas[-1][0] - deltas[0][0]) * 1000 / (tokens - deltas[0][1])
        return done, step_ms, audio_samples > 0

    async def fresh_beat(self) -> dict[str, int]:
        """The thinker's KV stats from a heartbeat sent after everything so far ran."""
        before = self.engine.kv_stats.get("thinker")

        async def beat() -> dict[str, int]:
            while self.engine.kv_stats.get("thinker") is before:  # noqa: ASYNC110 (no event)
                await asyncio.sleep(0.02)
            return self.engine.kv_stats["thinker"]

        return await asyncio.wait_for(beat(), HEARTBEAT_WAIT_S)

    async def turn(self, index: int) -> TurnSample:
        barge_in = self.plan.barge_in_every > 0 and (index + 1) % self.plan.barge_in_every == 0
        await self.speak(index)
        done, step_ms, answered = await self.reply(barge_in)
        kv = await self.fresh_beat()
        return TurnSample(
            turn=index + 1,
            minute=int(index * self.plan.turn_seconds // 60),
            answered=answered and done.status != "failed",
            barged_in=barge_in,
            context_tokens=self.engine.context_tokens.get(SESSION, 0),
            kv_bytes=kv.get("bytes_used", 0),
            step_ms=step_ms,
            first_audio_ms=done.timings.first_audio_ms,
            rss_mb=rss_mb(),
            frame_offset_ms=kv.get("frame_offset_ms_max"),
        )


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(statistics.median(kept)) if kept else None


def _max(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return max(kept) if kept else None


def minute_row(minute: int, samples: list[TurnSample]) -> dict[str, Any]:
    """One call minute: peaks of the context and memory, medians of the timings."""
    return {
        "minute": minute + 1,
        "turns": len(samples),
        "turns_answered": sum(s.answered for s in samples),
        "context_tokens": max(s.context_tokens for s in samples),
        "kv_bytes": max(s.kv_bytes for s in samples),
        "step_ms": _median([s.step_ms for s in samples]),
        "first_audio_ms": _median([s.first_audio_ms for s in samples]),
        "rss_mb": _max([s.rss_mb for s in samples]),
        "frame_audio_offset_ms": _max([s.frame_offset_ms for s in samples]),
    }


def summary(plan: CallPlan, samples: list[TurnSample], rows: list[dict], budget: int) -> dict:
    """The issue's summary object (its keys exactly), and a few more."""
    reached = next((r for r in rows if r["context_tokens"] >= REACHED * budget), None)
    at, last = reached or rows[-1], rows[-1]
    return {
        "minutes": plan.minutes,
        "turns": len(samples),
        "turns_answered": sum(s.answered for s in samples),
        "context_tokens_max": max(s.context_tokens for s in samples),
        "context_budget": budget,
        "step_ms_at_budget": at["step_ms"],
        "step_ms_last_minute": last["step_ms"],
        "rss_mb_at_budget": at["rss_mb"],
        "rss_mb_last_minute": last["rss_mb"],
        "budget_reached_minute": reached["minute"] if reached else None,
        "barge_ins": sum(s.barged_in for s in samples),
        "frame_audio_offset_ms_max": _max([s.frame_offset_ms for s in samples]),
        "simulated_clock": True,
    }


def context_budget(config: EngineConfig) -> int:
    return config.context_budget_tokens or config.max_context_tokens - config.reply_reserve_tokens


async def run_call(
    config: EngineConfig, plan: CallPlan, json_path: Path | None = None
) -> dict[str, Any]:
    """The whole call; the JSON file is rewritten after each call minute, so a run cut short
    keeps what it measured."""
    budget = context_budget(config)
    samples: list[TurnSample] = []
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"plan": asdict(plan), "per_minute": rows, "summary": None}
    print(table_head(), flush=True)
    async with running_engine(config) as engine:
        await engine.open_session(SESSION, SessionOptions())
        call = LongCall(engine, plan)
        for index in range(plan.turns):
            samples.append(await call.turn(index))
            minute = samples[-1].minute
            ends_minute = index + 1 == plan.turns or (
                int((index + 1) * plan.turn_seconds // 60) != minute
            )
            if ends_minute:
                rows.append(minute_row(minute, [s for s in samples if s.minute == minute]))
                print(table_row(rows[-1]), flush=True)
                if json_path is not None:
                    json_path.write_text(json.dumps(result, indent=2))
        await engine.close_session(SESSION)
    result["summary"] = summary(plan, samples, rows, budget)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    return result


COLUMNS = (
    ("minute", "minute", "{}"),
    ("turns", "answered", "{}"),
    ("context_tokens", "context tok", "{}"),
    ("kv_bytes", "KV MB", "{:.1f}"),
    ("step_ms", "step ms", "{:.1f}"),
    ("first_audio_ms", "first audio ms", "{:.0f}"),
    ("rss_mb", "RSS MB", "{:.0f}"),
    ("frame_audio_offset_ms", "frame offset ms", "{:.0f}"),
)


def table_head() -> str:
    return "  ".join(f"{title:>15}" for _, title, _ in COLUMNS)


def table_row(row: dict[str, Any]) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        value = row[key]
        if key == "turns":
            value = f"{row['turns_answered']}/{row['turns']}"
        elif key == "kv_bytes":
            value = fmt.format(value / 1e6)
        elif value is None:
            value = "-"
        else:
            value = fmt.format(value)
        cells.append(f"{value:>15}")
    return "  ".join(cells)


def run(args: argparse.Namespace) -> int:
    from omni.checkpoints.loader import resolve_model
    from omni.engine.engine import resolve_devices
    from omni.settings import Settings

    if args.threads:
        os.environ["OMNI_CPU_THREADS"] = str(args.threads)
    resolved = resolve_model(args.model)
    thinker_device, talker_device = resolve_devices(args.device)
    defaults = Settings()
    config = EngineConfig(
        model_path=str(resolved.path),
        thinker_device=thinker_device,
        talker_device=talker_device,
        max_codec_tokens=args.reply_codes,
        max_frame_side=defaults.engine_max_frame_side,
        kv_slots=1,  # one call
        max_context_tokens=args.max_context,
        context_budget_tokens=args.budget,
        heartbeat_timeout_s=600,  # real-size shapes on a CPU take long steps
        start_timeout_s=1800,
    )
    plan = CallPlan(
        minutes=args.minutes,
        turn_seconds=args.turn_seconds,
        speech_seconds=args.speech_seconds,
        barge_in_every=args.barge_in_every,
        fps=args.fps or defaults.video_max_fps,
        frame_width=args.frame_width,
        frame_height=args.frame_height,
        frame_jitter_ms=args.frame_jitter_ms,
        reply_text_tokens=args.reply_tokens,
        reply_codec_tokens=args.reply_codes,
    )
    print(
        f"model {resolved.name}: a {plan.minutes:g}-minute call on a simulated clock, a turn "
        f"every {plan.turn_seconds:g} s ({plan.speech_seconds:g} s of speech, camera at "
        f"{plan.fps:g} fps), a barge-in every {plan.barge_in_every} replies; context budget "
        f"{context_budget(config)} tokens",
        flush=True,
    )
    result = asyncio.run(run_call(config, plan, Path(args.json) if args.json else None))
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        print(f"wrote {args.json}")
    s = result["summary"]
    return 0 if s["turns_answered"] == s["turns"] else 1


def add_long_call_command(actions: argparse._SubParsersAction) -> None:
    bench = actions.add_parser(
        "long-call",
        help="one long simulated video call through the engine: context, memory and timings "
        "per minute",
    )
    bench.add_argument("--minutes", type=float, default=30.0, help="call length (default 30)")
    bench.add_argument(
        "--budget",
        type=int,
        help="context budget in tokens (EngineConfig.context_budget_tokens; default: the "
        "context length minus the reply reserve); small values reach it in short runs",
    )
    bench.add_argument(
        "--max-context", type=int, default=32768, help="KV memory per session (default 32768)"
    )
    bench.add_argument("--model", default="tiny", help="preset, checkpoint directory or hub id")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument("--threads", type=int, help="torch threads per process on CPU")
    bench.add_argument("--turn-seconds", type=float, default=20.0, help="a user turn every (20)")
    bench.add_argument(
        "--speech-seconds", type=float, default=4.0, help="the caller speaks this long (4)"
    )
    bench.add_argument(
        "--barge-in-every", type=int, default=3, help="interrupt every Nth reply (3; 0: never)"
    )
    bench.add_argument("--fps", type=float, help="camera frames per second (video_max_fps)")
    bench.add_argument("--frame-width", type=int, default=320, help="camera frame width (320)")
    bench.add_argument("--frame-height", type=int, default=240, help="camera frame height (240)")
    bench.add_argument(
        "--frame-jitter-ms", type=float, default=20.0, help="capture time jitter, +/- (20)"
    )
    bench.add_argument("--reply-tokens", type=int, default=16, help="text tokens per reply (16)")
    bench.add_argument("--reply-codes", type=int, default=48, help="codec tokens per reply (48)")
    bench.add_argument("--json", help="write the per-minute rows and the summary here")
    bench.set_defaults(run=run)
