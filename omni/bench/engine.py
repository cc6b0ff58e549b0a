"""`omni bench engine`: the streaming engine against transformers' generate(), in one run.

The same turn (a text question) goes through the streaming engine (both worker processes)
and through `Qwen2_5OmniForConditionalGeneration.generate()`, greedy, with the reply held to
the same length on both paths (the end tokens are suppressed until N tokens, and N is also
the cap). For each path: time to the first text token, to the first audio sample, in total,
and the real-time factor (compute time / speech duration); and whether the streamed tokens
equal the reference's. The engine runs first and is stopped before the reference loads, so
the two never compete for the CPU or GPU. `--sessions N ...` runs N concurrent sessions
instead, batched and unbatched (sessions.py).

A Qwen3-Omni checkpoint (its family read from config.json by `resolve_model`) runs the same
way, through the same worker processes, against `Qwen3OmniMoeForConditionalGeneration.generate()`;
its caps count 80 ms frames (see `caps`). With `--in-process` its streamed path is instead
`Qwen3OmniStreamer` in this process, on the reference's own loaded model (qwen3.py): what
scripts/gpu-check runs at the 30B shapes, where that saves building the model twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from omni.bench.reference import ReferenceConversation
from omni.checkpoints.family import QWEN3_OMNI, Family
from omni.checkpoints.loader import ResolvedModel, resolve_model
from omni.engine.api import ReplyDone, ReplyOptions, SessionOptions
from omni.engine.engine import EngineConfig, _dtype_for, resolve_devices, running_engine

log = logging.getLogger(__name__)

PROMPT = "Please tell me, in a few sentences, what a good morning routine looks like."
WARMUP = dict(max_text_tokens=4, max_codec_tokens=24)
DEFAULT_SPEECH_MS = 10_000  # --codec-tokens' default: 500 Qwen2.5 codes, 125 Qwen3 frames
TEXT_TOKENS_PER_S = 10  # --text-tokens' default, per second of speech the codec cap gives
IN_PROCESS = "--in-process runs the Qwen3-Omni streamer: a Qwen3-Omni checkpoint's, one reply"


@dataclass
class PathResult:
    first_text_ms: float
    first_audio_ms: float
    total_ms: float
    rtf: float


@dataclass
class EngineBench:
    model: str
    text_tokens: int
    codec_tokens: int
    speech_seconds: float
    streaming: PathResult
    reference: PathResult
    matches_reference: bool

    def as_json(self) -> dict:
        return asdict(self)


async def _streaming(config: EngineConfig, text_tokens: int, codec_tokens: int) -> tuple[PathResult, ReplyDone]:
    async with running_engine(config) as engine:
        await engine.open_session("bench", SessionOptions())
        for options in (
            ReplyOptions(greedy=True, **WARMUP),
            ReplyOptions(
                greedy=True,
                max_text_tokens=text_tokens,
                min_text_tokens=text_tokens,
                max_codec_tokens=codec_tokens,
                min_codec_tokens=codec_tokens,
            ),
        ):
            # a fresh conversation for the measured turn, like the reference's
            await engine.close_session("bench")
            await engine.open_session("bench", SessionOptions())
            await engine.add_text("bench", PROMPT)
            done = None
            async for event in engine.respond("bench", options):
                if isinstance(event, ReplyDone):
                    done = event
        assert done is not None
    if done.status != "completed":
        raise RuntimeError(f"the streaming reply {done.status}: {done.error}")
    t = done.timings
    speech_ms = done.audio_samples / 24
    result = PathResult(t.first_text_ms or 0.0, t.first_audio_ms or 0.0, t.total_ms or 0.0, (t.total_ms or 0.0) / speech_ms)
    return result, done


def _reference(path: Path, device: str, dtype: torch.dtype, text_tokens: int, codec_tokens: int):
    from omni.checkpoints.parts import load_whole
    from omni.checkpoints.processor import load_processor

    model = load_whole(path, device, dtype)
    processor = load_processor(path)
    for warm, lengths in ((True, WARMUP), (False, None)):
        conv = ReferenceConversation(model, processor)
        conv.user_turn(text=PROMPT)
        if warm:
            conv.generate(**lengths)
            continue
        reply = conv.generate(
            max_text_tokens=text_tokens,
            min_text_tokens=text_tokens,
            max_codec_tokens=codec_tokens,
            min_codec_tokens=codec_tokens,
        )
    speech_ms = reply.wav.size / 24
    # generate() returns audio only when everything is done: first audio = total
    result = PathResult(reply.first_text_ms, reply.total_ms, reply.total_ms, reply.total_ms / speech_ms)
    return result, reply


def caps(args: argparse.Namespace, family: Family) -> tuple[int, int]:
    """(codec tokens, text tokens) of the reply. A codec token is the family's talker token:
    a 20 ms code (Qwen2.5-Omni) or an 80 ms frame of 16 codes (Qwen3-Omni), as presets.toml's
    max_codec_tokens counts them; the defaults are 10 s of speech and 10 text tokens a second
    (Qwen2.5: codec tokens / 5)."""
    codec_tokens = args.codec_tokens or DEFAULT_SPEECH_MS // family.codec_token_ms
    text_tokens = args.text_tokens or max(
        1, codec_tokens * family.codec_token_ms * TEXT_TOKENS_PER_S // 1000
    )
    return codec_tokens, text_tokens


def run(args: argparse.Namespace) -> int:
    resolved = resolve_model(args.model)
    if args.in_process and (resolved.family is not QWEN3_OMNI or args.sessions):
        print(f"omni bench engine: error: {IN_PROCESS}", file=sys.stderr)
        return 2
    if args.threads:
        os.environ["OMNI_CPU_THREADS"] = str(args.threads)
    torch.set_num_threads(int(os.environ.get("OMNI_CPU_THREADS", "1")))
    torch.set_grad_enabled(False)
    codec_tokens, text_tokens = caps(args, resolved.family)
    if args.in_process:
        return _run_qwen3(args, resolved, codec_tokens, text_tokens)
    args.codec_tokens = codec_tokens  # run_sessions reads it too
    thinker_device, talker_device = resolve_devices(args.device)
    config = EngineConfig(
        model_path=str(resolved.path),
        thinker_device=thinker_device,
        talker_device=talker_device,
        dtype=args.dtype,
        max_codec_tokens=codec_tokens,
        vocoder_solver=args.vocoder_solver,
        start_timeout_s=1800,
        heartbeat_timeout_s=600,  # real-size shapes on a CPU take long steps
    )
    # the reference runs in the thinker's dtype, as the engine picks it
    dtype = getattr(torch, _dtype_for(args.dtype, thinker_device))
    if args.sessions:
        from omni.bench.sessions import run_sessions  # here: it uses this module's WARMUP

        return run_sessions(args, resolved, config, dtype, text_tokens)
    speech_s = codec_tokens * resolved.family.codec_token_ms / 1000
    print(f"model {resolved.name} ({resolved.family.name}): {text_tokens} text tokens, "
          f"{codec_tokens} codec tokens ({speech_s:.2f} s of speech), greedy")
    streaming, done = asyncio.run(_streaming(config, text_tokens, codec_tokens))
    reference, reply = _reference(
        resolved.path, thinker_device, dtype, text_tokens, codec_tokens
    )
    matches = done.text_token_ids == reply.text_ids and done.codec_tokens == reply.codes
    bench = EngineBench(
        model=resolved.name,
        text_tokens=text_tokens,
        # what was said: Qwen3-Omni's generate() voices one frame less than its cap
        codec_tokens=len(done.codec_tokens) // resolved.family.codebooks,
        speech_seconds=done.audio_samples / 24000,
        streaming=streaming,
        reference=reference,
        matches_reference=matches,
    )
    print(table(bench))
    if args.json:
        Path(args.json).write_text(json.dumps(bench.as_json(), indent=2))
        print(f"wrote {args.json}")
    return 0 if matches else 1


def _run_qwen3(
    args: argparse.Namespace, resolved: ResolvedModel, codec_tokens: int, text_tokens: int
) -> int:
    """The Qwen3 streamer against generate() on one model loaded in this process (qwen3.py)."""
    from transformers import AutoTokenizer

    from omni.bench.qwen3 import run_bench, text_prompt  # here: qwen3.py imports this module
    from omni.checkpoints.parts import load_whole
    from omni.engine.qwen3_stream import StreamOptions

    device, _ = resolve_devices(args.device)  # one model, one device: the thinker's
    model = load_whole(resolved.path, device, getattr(torch, _dtype_for(args.dtype, device)))
    input_ids = text_prompt(AutoTokenizer.from_pretrained(resolved.path), PROMPT).to(device)
    speech_s = codec_tokens * resolved.family.codec_token_ms / 1000
    print(f"model {resolved.name} ({resolved.family.name}): at most {text_tokens} text tokens "
          f"and {codec_tokens} frames ({speech_s:.2f} s of speech), greedy; streamed in-process")
    options = StreamOptions(max_text_tokens=text_tokens, max_codec_frames=codec_tokens)
    bench = run_bench(model, input_ids, options, args.json, model_name=resolved.name)
    return 0 if bench.matches_reference else 1


def path_table(paths: dict[str, PathResult]) -> list[str]:
    """One aligned line per path (and a header): first text, first audio, total, RTF."""
    rows = [("path", "first text ms", "first audio ms", "total ms", "RTF")]
    for name, r in paths.items():
        rows.append((name, f"{r.first_text_ms:.0f}", f"{r.first_audio_ms:.0f}", f"{r.total_ms:.0f}", f"{r.rtf:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]


def table(bench: EngineBench) -> str:
    """The paths' table and how much sooner streaming's first audio is (Qwen3Bench too)."""
    lines = path_table({"streaming": bench.streaming, "reference": bench.reference})
    speedup = bench.reference.first_audio_ms / max(bench.streaming.first_audio_ms, 1e-9)
    lines.append(f"first audio {speedup:.1f}x sooner; matches_reference: {bench.matches_reference}")
    return "\n".join(lines)


def add_engine_command(actions: argparse._SubParsersAction) -> None:
    bench = actions.add_parser(
        "engine",
        help="streaming engine vs transformers generate(), same turn",
    )
    bench.add_argument("--model", default="tiny", help="preset, checkpoint directory or hub id (default: tiny)")
    bench.add_argument(
        "--codec-tokens",
        type=int,
        help="reply length in talker tokens: Qwen2.5-Omni codes of 20 ms, Qwen3-Omni frames of "
        "80 ms (16 codes each; generate() voices one frame less than its cap); default 10 s of "
        "speech (500 codes, 125 frames)",
    )
    bench.add_argument(
        "--text-tokens",
        type=int,
        help="reply length in text tokens (default: 10 per second of speech, i.e. codec tokens / 5 "
        "on Qwen2.5-Omni, frames * 4 / 5 on Qwen3-Omni); on Qwen3-Omni both are caps",
    )
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument(
        "--vocoder-solver",
        default="rk4",
        choices=("rk4", "euler"),
        help="Token2Wav ODE solver for the streaming path (default rk4, the reference's own; "
        "Qwen2.5-Omni only)",
    )
    bench.add_argument("--threads", type=int, help="torch threads per process on CPU (default 1)")
    bench.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="weights dtype of the engine and the reference (auto: bfloat16 on GPU, else float32)",
    )
    bench.add_argument(
        "--sessions",
        type=int,
        nargs="+",
        metavar="N",
        help="instead: N concurrent sessions, each its own question, batched vs unbatched "
        "(max_batch=1), started together and staggered; one table per N",
    )
    bench.add_argument(
        "--in-process",
        action="store_true",
        help="Qwen3-Omni only: its stage-by-stage streamer in this process, on the reference's "
        "own model (no worker processes; what scripts/gpu-check runs at the real shapes)",
    )
    bench.add_argument(
        "--stagger-s",
        type=float,
        default=1.0,
        help="with --sessions: the staggered runs' start times spread over this long (default 1)",
    )
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(run=run)
