"""`omni bench engine --sessions N ...`: N concurrent replies, batched and unbatched.

Each of the N sessions asks its own question (greedy, every reply held to the same text and
codec lengths). The replies run through one engine with batching on (the default
`max_batch`) and through one with it off (`max_batch=1`), first started together, then with
their start times spread over `--stagger-s`. Per run: aggregate codec tokens per second (all
codes over the wall time from the first ask to the last reply's end), first audio p50/p95
and the real-time factor's p95 (a reply's time / its speech's length). After the engines are
stopped (the reference is never timed against them), every session's question goes through
transformers' generate() alone, and `matches_reference` says whether every run's reply for
it had the same text and codec tokens.

The per-stage profile is read from what the engine reports per reply (ReplyDone timings)
and when the client saw its text; `STAGES` lists each stage and how it is computed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from omni.bench.engine import WARMUP
from omni.bench.reference import ReferenceConversation, ReferenceReply
from omni.checkpoints.loader import ResolvedModel
from omni.engine.api import (
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_CODE,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
    TextDelta,
)
from omni.engine.engine import EngineConfig, OmniEngine, running_engine

# one distinct question per session; past the list, a session's number makes it distinct
QUESTIONS = (
    "Please tell me, in a few sentences, what a good morning routine looks like.",
    "How do I make a simple tomato sauce for pasta?",
    "What is the difference between weather and climate?",
    "Can you explain how a bicycle stays upright?",
    "What should I pack for a weekend hiking trip?",
    "Why is the sky blue during the day and red at sunset?",
    "How can I get better at remembering people's names?",
    "What are some tips for learning to play the guitar?",
    "How does a refrigerator keep food cold?",
    "What is a good way to start running if I have never done it?",
    "Could you describe how bees make honey?",
    "What makes a cup of coffee taste bitter?",
    "How do airplanes manage to fly so high?",
    "What are a few easy houseplants for a dark apartment?",
    "How should I prepare for a job interview tomorrow?",
    "Why do cats purr, and what does it mean?",
)
MODES = {"batched": None, "unbatched": 1}  # mode -> max_batch (None: the engine's default)
STARTS = ("together", "staggered")


def question(session: int) -> str:
    base = QUESTIONS[session % len(QUESTIONS)]
    return base if session < len(QUESTIONS) else f"{base} (I am caller {session + 1}.)"


@dataclass
class SessionReply:
    """One session's reply as the bench client saw it."""

    session: int
    done: ReplyDone
    last_text_ms: float | None  # from the ask to the last text delta
    talker_tokens: int  # codes (Qwen2.5-Omni) or frames of 16 codes (Qwen3-Omni)


@dataclass
class PassResult:
    """One run of N replies: the engine mode, how they started, what came back."""

    mode: str
    start: str
    wall_s: float
    replies: list[SessionReply]

    def summary(self) -> dict:
        # codec tokens are talker tokens: Qwen2.5-Omni codes, Qwen3-Omni frames
        codes = sum(r.talker_tokens for r in self.replies)
        first_audio = [r.done.timings.first_audio_ms or 0.0 for r in self.replies]
        rtf = [(r.done.timings.total_ms or 0.0) / _speech_ms(r.done) for r in self.replies]
        return {
            "codec_tokens_per_s": codes / self.wall_s,
            "first_audio_ms": {
                "p50": float(np.percentile(first_audio, 50)),
                "p95": float(np.percentile(first_audio, 95)),
            },
            "rtf_p95": float(np.percentile(rtf, 95)),
        }


def _speech_ms(done: ReplyDone) -> float:
    return max(done.audio_samples, SAMPLES_PER_CODE) * 1000 / OUTPUT_SAMPLE_RATE


def _decode_per_token(reply: SessionReply) -> float | None:
    t = reply.done.timings
    if reply.last_text_ms is None or t.first_text_ms is None or reply.done.text_tokens < 2:
        return None
    return (reply.last_text_ms - t.first_text_ms) / (reply.done.text_tokens - 1)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _tail_per_code(reply: SessionReply) -> float | None:
    t = reply.done.timings
    tail = _minus(t.total_ms, t.first_codec_ms)
    codes = reply.talker_tokens
    return None if tail is None or not codes else tail / codes


# stage -> (what it measures, how it is read from one reply); medians over a run's replies
STAGES: dict[str, tuple[str, Callable[[SessionReply], float | None]]] = {
    "thinker_prefill_ms": ("thinker: the turn's prefill", lambda r: r.done.timings.prefill_ms),
    "thinker_first_token_ms": (
        "thinker: ask to first text token",
        lambda r: r.done.timings.first_text_ms,
    ),
    "thinker_decode_ms_per_token": ("thinker: decode, per text token", _decode_per_token),
    # from the ask, not from the first text: a text delta waits for whole UTF-8 characters
    "talker_first_code_ms": ("talker: ask to first code", lambda r: r.done.timings.first_codec_ms),
    "first_chunk_ms": (
        "vocoder: first code to first audio (codes for one chunk + its decode)",
        lambda r: _minus(r.done.timings.first_audio_ms, r.done.timings.first_codec_ms),
    ),
    "tail_ms_per_code": (
        "talker steps + vocoder, overlapped, per talker token",
        _tail_per_code,
    ),
}


def profile(run: PassResult) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, (_, read) in STAGES.items():
        values = [v for v in map(read, run.replies) if v is not None]
        out[name] = float(np.median(values)) if values else None
    return out


async def _reply(
    engine: OmniEngine, session: int, delay_s: float, options: ReplyOptions
) -> SessionReply:
    await asyncio.sleep(delay_s)
    asked = time.perf_counter()
    last_text, done = None, None
    async for event in engine.respond(f"bench-{session}", options):
        if isinstance(event, TextDelta):
            last_text = (time.perf_counter() - asked) * 1000
        elif isinstance(event, ReplyDone):
            done = event
    assert done is not None
    if done.status != "completed":
        raise RuntimeError(f"session {session}'s reply {done.status}: {done.error}")
    return SessionReply(session, done, last_text, len(done.codec_tokens) // engine.family.codebooks)


async def _pass(
    engine: OmniEngine, sessions: int, stagger_s: float, options: ReplyOptions
) -> tuple[float, list[SessionReply]]:
    """`sessions` fresh conversations, one question each; replies asked `stagger_s` apart
    in all (0: together). Returns the wall time and the replies."""
    for i in range(sessions):
        await engine.open_session(f"bench-{i}", SessionOptions())
        await engine.add_text(f"bench-{i}", question(i))
    step = stagger_s / (sessions - 1) if sessions > 1 else 0.0
    started = time.perf_counter()
    try:
        replies = await asyncio.gather(
            *(_reply(engine, i, i * step, options) for i in range(sessions))
        )
    finally:
        for i in range(sessions):
            await engine.close_session(f"bench-{i}")
    return time.perf_counter() - started, list(replies)


async def _run_mode(
    config: EngineConfig, mode: str, counts: list[int], stagger_s: float, options: ReplyOptions
) -> list[PassResult]:
    results = []
    async with running_engine(config) as engine:
        await _pass(engine, 1, 0.0, ReplyOptions(greedy=True, **WARMUP))
        for sessions in counts:
            for start, spread in (("together", 0.0), ("staggered", stagger_s)):
                wall, replies = await _pass(engine, sessions, spread, options)
                results.append(PassResult(mode, start, wall, replies))
                # a line per run as it ends: what is measured survives a run cut short
                line = f"  {sessions} session(s), {mode}, {start}: {_line(results[-1].summary())}"
                print(line, flush=True)
    return results


def _references(
    model_path: Path, device: str, dtype: torch.dtype, sessions: int, lengths: dict
) -> list[ReferenceReply]:
    """generate() for each of the first `sessions` questions alone."""
    from omni.checkpoints.parts import load_whole
    from omni.checkpoints.processor import load_processor

    model = load_whole(model_path, device, dtype)
    processor = load_processor(model_path)
    replies = []
    for i in range(sessions):
        conv = ReferenceConversation(model, processor)
        conv.user_turn(text=question(i))
        replies.append(conv.generate(**lengths))
    return replies


def _first_difference(got: list[int], want: list[int]) -> int | None:
    """Where two token lists part (None: equal). A late one in bfloat16 is most likely a
    greedy choice between near-equal logits flipped by rounding; one at 0 is a real bug."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def _mismatch(reply: SessionReply, reference: ReferenceReply) -> str | None:
    """What differs from generate() (None: nothing)."""
    text = _first_difference(reply.done.text_token_ids, reference.text_ids)
    codes = _first_difference(reply.done.codec_tokens, reference.codes)
    differences = []
    if text is not None:
        differences.append(f"text from token {text}")
    if codes is not None:
        differences.append(f"codes from code {codes}")
    return f"session {reply.session}: {', '.join(differences)}" if differences else None


def _result(
    sessions: int,
    runs: dict[tuple[str, str], PassResult],
    references: list[ReferenceReply],
    stagger_s: float,
    about: dict,
) -> dict:
    """One N's JSON object: batched and unbatched started together at the top level."""
    mismatched = sorted(
        f"{mode} {start}: {problem}"
        for (mode, start), run in runs.items()
        for reply in run.replies
        if (problem := _mismatch(reply, references[reply.session])) is not None
    )
    return {
        "sessions": sessions,
        **{mode: runs[(mode, "together")].summary() for mode in MODES},
        "staggered": {
            "stagger_s": stagger_s,
            **{mode: runs[(mode, "staggered")].summary() for mode in MODES},
        },
        "matches_reference": not mismatched,
        "mismatched": mismatched,
        **about,
        "profile": {mode: profile(runs[(mode, "together")]) for mode in MODES},
    }


def run_sessions(
    args: argparse.Namespace,
    resolved: ResolvedModel,
    config: EngineConfig,
    dtype: torch.dtype,
    text_tokens: int,
) -> int:
    counts = list(dict.fromkeys(args.sessions))  # each count once, in the order given
    if min(counts) < 1:
        raise SystemExit("omni bench engine: --sessions takes counts of at least 1")
    lengths = dict(
        max_text_tokens=text_tokens,
        min_text_tokens=text_tokens,
        max_codec_tokens=args.codec_tokens,
        min_codec_tokens=args.codec_tokens,
    )
    options = ReplyOptions(greedy=True, **lengths)
    print(
        f"model {resolved.name}: sessions {' '.join(map(str, counts))}, each {text_tokens} text "
        f"tokens and {args.codec_tokens} codec tokens, greedy; batched and unbatched "
        f"(max_batch=1), started together and spread over {args.stagger_s:g} s",
        flush=True,
    )
    runs: list[PassResult] = []
    for mode, max_batch in MODES.items():
        mode_config = config if max_batch is None else replace(config, max_batch=max_batch)
        runs += asyncio.run(_run_mode(mode_config, mode, counts, args.stagger_s, options))
    references = _references(resolved.path, config.thinker_device, dtype, max(counts), lengths)
    about = {"model": resolved.name, "text_tokens": text_tokens, "codec_tokens": args.codec_tokens}
    results = []
    for sessions in counts:
        runs_of_n = {(r.mode, r.start): r for r in runs if len(r.replies) == sessions}
        results.append(_result(sessions, runs_of_n, references, args.stagger_s, about))
        print(table(results[-1]))
    print(profile_table(results))
    if args.json:
        written = results if len(results) > 1 else results[0]
        Path(args.json).write_text(json.dumps(written, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(r["matches_reference"] for r in results) else 1


def _line(summary: dict) -> str:
    audio = summary["first_audio_ms"]
    return (
        f"{summary['codec_tokens_per_s']:.1f} codec tok/s, first audio p50 {audio['p50']:.0f} ms "
        f"p95 {audio['p95']:.0f} ms, RTF p95 {summary['rtf_p95']:.2f}"
    )


def _format(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def table(result: dict) -> str:
    rows = [("run", "codec tok/s", "first audio p50 ms", "p95 ms", "RTF p95")]
    for start in STARTS:
        for mode in MODES:
            s = result[mode] if start == "together" else result["staggered"][mode]
            rows.append((
                f"{mode}, {start}",
                f"{s['codec_tokens_per_s']:.1f}",
                f"{s['first_audio_ms']['p50']:.0f}",
                f"{s['first_audio_ms']['p95']:.0f}",
                f"{s['rtf_p95']:.2f}",
            ))
    head = f"{result['sessions']} session(s); matches_reference: {result['matches_reference']}"
    return "\n".join([head, *_format(rows)])


def profile_table(results: list[dict]) -> str:
    """Where the time goes: each stage's median over a run's replies (started together)."""
    columns = [(r["sessions"], mode) for r in results for mode in MODES]
    rows = [("stage (median ms)", *(f"N={n} {mode}" for n, mode in columns))]
    by_n = {r["sessions"]: r for r in results}
    for name, (what, _) in STAGES.items():
        values = (by_n[n]["profile"][mode][name] for n, mode in columns)
        rows.append((what, *("-" if v is None else f"{v:.1f}" for v in values)))
    return "\n".join(["per-stage profile", *_format(rows)])
