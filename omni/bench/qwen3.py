"""Qwen3-Omni: the stage-by-stage streamer against transformers' generate(), on one loaded model.

The same prompt, greedy, with the same text and codec caps, goes through `Qwen3OmniStreamer`
and through `Qwen3OmniMoeForConditionalGeneration.generate()`. For each: time to the first
text token and to the first audio sample, the total, and the real-time factor (compute time /
speech duration); generate() returns everything at the end, so its first text and audio are its
total. `matches_reference` says whether the text tokens, every codebook's codes and the waveform
(to WAV_TOLERANCE of its peak) are the same; `mismatched` names those that are not.
`omni bench engine --model tiny-qwen3-omni --in-process` (engine.py) calls `run_bench` with the loaded
checkpoint; the JSON has the Qwen2.5 bench's keys (EngineBench), and more.

The streamed path is the streamer in this process, on the reference's own model (`bench engine
--in-process`; without it the bench runs the engine's worker processes, as for Qwen2.5-Omni), so
it measures the stage-by-stage streaming without the engine's process hops and scheduling, and
builds the model once for both paths (at the GPU check's 30B shapes one 70.5 GB build, where
the worker processes and then the reference would build it twice).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Qwen3OmniMoeForConditionalGeneration

from omni.bench.engine import EngineBench, PathResult, table as engine_table
from omni.engine.qwen3_code2wav import AudioChunk
from omni.engine.qwen3_stream import (
    CodecFrame,
    Qwen3OmniStreamer,
    StreamOptions,
    TextToken,
)

SAMPLE_RATE = 24000
# the streamed waveform against generate()'s: max abs difference over the reference's peak
# (float32 rounding of the same Code2Wav over a window instead of the whole reply). Measured on
# CPU, fp32: ~5e-7 with tests/test_qwen3_stream.py's weights (peak ~0.007), ~3e-5 with the tiny
# checkpoint's (loud: RMS 0.2, peak 1.0; ~3e-8 in float64), so 1e-4 (-80 dB) of the peak.
WAV_TOLERANCE = 1e-4


@dataclass
class Reply:
    text_ids: list[int]
    codes: torch.Tensor  # (16, frames)
    wav: torch.Tensor  # (samples,)


STREAMED_BY = "Qwen3OmniStreamer, in-process (not the engine's worker processes)"


@dataclass
class Qwen3Bench(EngineBench):
    """EngineBench's fields (text_tokens and codec_tokens: the reply's, codec tokens counting
    80 ms frames; speech_seconds: generate()'s waveform), then the caps and what streamed."""

    max_text_tokens: int = 0
    max_codec_frames: int = 0
    family: str = "Qwen3-Omni"
    sessions: int = 1
    streamed_by: str = STREAMED_BY
    # what differs from generate()'s reply (empty when matches_reference), and the waveform's
    # max difference over its peak (the tolerance: WAV_TOLERANCE; inf: other lengths)
    mismatched: list[str] = field(default_factory=list)
    wav_error: float = 0.0


def chat_prompt(config, user_ids: list[int], system_ids: list[int] = (100, 101)) -> torch.Tensor:
    """(1, T) ids of a system turn, one user turn and the assistant header, from token ids."""
    newline = 198  # "\n" in the Qwen tokenizers
    ids = [
        config.im_start_token_id,
        config.system_token_id,
        newline,
        *system_ids,
        config.im_end_token_id,
        newline,
    ]
    ids += [
        config.im_start_token_id,
        config.user_token_id,
        newline,
        *user_ids,
        config.im_end_token_id,
        newline,
    ]
    ids += [config.im_start_token_id, config.assistant_token_id, newline]
    return torch.tensor([ids])


def text_prompt(tokenizer, text: str) -> torch.Tensor:
    """(1, T) ids of one user turn of `text` and the assistant header, by the chat template."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, return_tensors="pt").input_ids


def generate_options(options: StreamOptions) -> dict:
    """generate()'s keyword arguments for the same greedy reply as `options`."""
    if not options.greedy:
        raise ValueError("the reference comparison is greedy")
    return {
        "speaker": options.speaker,
        "thinker_max_new_tokens": options.max_text_tokens,
        "thinker_eos_token_id": list(options.text_eos),
        "thinker_do_sample": False,
        "talker_max_new_tokens": options.max_codec_frames,
        "talker_do_sample": False,
        "talker_repetition_penalty": options.talker_repetition_penalty,
    }


@torch.no_grad()
def reference_reply(
    model: Qwen3OmniMoeForConditionalGeneration,
    input_ids: torch.Tensor,
    options: StreamOptions,
    **media,
) -> Reply:
    """generate()'s reply; its codes are read on the way into Code2Wav (a forward pre-hook)."""
    seen: list[torch.Tensor] = []
    hook = model.code2wav.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        sequences, wav = model.generate(input_ids, **generate_options(options), **media)
    finally:
        hook.remove()
    codes = (
        torch.cat([codes[0] for codes in seen], dim=-1)
        if seen
        else torch.zeros(16, 0, dtype=torch.long)
    )
    return Reply(sequences[0, input_ids.shape[1] :].tolist(), codes, wav.reshape(-1))


def wav_error(wav: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference of two waveforms over the reference's peak (inf: other lengths)."""
    if wav.shape != reference.shape:
        return float("inf")
    difference = float((wav - reference).abs().max()) if wav.numel() else 0.0
    peak = float(reference.abs().max()) if reference.numel() else 0.0
    return difference / peak if peak else (0.0 if difference == 0 else float("inf"))


def mismatched(streamed: Reply, reference: Reply) -> list[str]:
    """Which of the text tokens, the codes and the waveform (to WAV_TOLERANCE) differ."""
    differ = {
        "text": streamed.text_ids != reference.text_ids,
        "codes": not torch.equal(streamed.codes, reference.codes),
        "waveform": wav_error(streamed.wav, reference.wav) > WAV_TOLERANCE,
    }
    return [part for part, different in differ.items() if different]


@torch.no_grad()
def streamed_reply(
    model: Qwen3OmniMoeForConditionalGeneration,
    input_ids: torch.Tensor,
    options: StreamOptions,
    **media,
) -> tuple[Reply, PathResult]:
    start = time.perf_counter()
    first_text = first_audio = None
    text, frames, audio = [], [], []
    for event in Qwen3OmniStreamer(model, options).stream(input_ids, **media):
        if isinstance(event, TextToken):
            first_text = first_text or time.perf_counter()
            text.append(event.token_id)
        elif isinstance(event, CodecFrame):
            frames.append(event.codes)
        elif isinstance(event, AudioChunk):
            first_audio = first_audio or time.perf_counter()
            audio.append(event.samples)
    total = time.perf_counter() - start
    wav = torch.cat(audio) if audio else torch.zeros(0)
    codes = torch.stack(frames, dim=-1) if frames else torch.zeros(16, 0, dtype=torch.long)
    timing = _timing(start, first_text, first_audio, total, wav.numel())
    return Reply(text, codes, wav), timing


def _timing(
    start: float, first_text: float | None, first_audio: float | None, total: float, samples: int
) -> PathResult:
    speech_s = samples / SAMPLE_RATE
    return PathResult(
        first_text_ms=((first_text or start + total) - start) * 1000,
        first_audio_ms=((first_audio or start + total) - start) * 1000,
        total_ms=total * 1000,
        rtf=total / speech_s if speech_s else float("inf"),
    )


def run_bench(
    model: Qwen3OmniMoeForConditionalGeneration,
    input_ids: torch.Tensor | None = None,
    options: StreamOptions | None = None,
    json_path: Path | str | None = None,
    model_name: str | None = None,
) -> Qwen3Bench:
    """One greedy reply both ways (after one warm-up each); prints the table, writes the JSON."""
    input_ids = (
        input_ids if input_ids is not None else chat_prompt(model.config, [3000, 4000, 5000])
    )
    options = options or StreamOptions(max_text_tokens=12, max_codec_frames=40)
    streamed_reply(model, input_ids, options)
    reference_reply(model, input_ids, options)
    streamed, streamed_timing = streamed_reply(model, input_ids, options)
    start = time.perf_counter()
    reference = reference_reply(model, input_ids, options)
    total = time.perf_counter() - start
    differ = mismatched(streamed, reference)
    bench = Qwen3Bench(
        model=model_name or model.config.name_or_path or "Qwen3-Omni",
        text_tokens=len(reference.text_ids),
        codec_tokens=reference.codes.shape[1],
        speech_seconds=reference.wav.numel() / SAMPLE_RATE,
        streaming=streamed_timing,
        reference=_timing(start, None, None, total, reference.wav.numel()),
        matches_reference=not differ,
        max_text_tokens=options.max_text_tokens,
        max_codec_frames=options.max_codec_frames,
        mismatched=differ,
        wav_error=wav_error(streamed.wav, reference.wav),
    )
    print(table(bench))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(bench.as_json(), indent=2))
        print(f"wrote {json_path}")
    return bench


def table(bench: Qwen3Bench) -> str:
    lines = [
        engine_table(bench),
        f"reply: {bench.text_tokens} text tokens, {bench.codec_tokens} frames "
        f"({bench.speech_seconds:.2f} s of speech)",
        f"streaming: {bench.streamed_by}; reference: generate(), its audio at its end",
    ]
    if bench.mismatched:
        lines.append(
            f"differs from generate(): {', '.join(bench.mismatched)} (waveform error "
            f"{bench.wav_error:.1e} of its peak; tolerance {WAV_TOLERANCE:.0e})"
        )
    return "\n".join(lines)
