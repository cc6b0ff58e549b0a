"""Qwen3-Omni: the stage-by-stage streamer against transformers' generate(), on one loaded model.

The same prompt, greedy, with the same text and codec caps, goes through `Qwen3OmniStreamer`
and through `Qwen3OmniMoeForConditionalGeneration.generate()`. For each: time to the first
text token and to the first audio sample, the total, and the real-time factor (compute time /
speech duration); generate() returns everything at the end, so its first text and audio are its
total. `matches_reference` says whether the text tokens, every codebook's codes and the waveform
(to WAV_TOLERANCE) are the same. `omni bench engine --model tiny-qwen3-omni` is meant to call
`run_bench` with the loaded tiny checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen3OmniMoeForConditionalGeneration

from omni.bench.engine import PathResult, path_table
from omni.engine.qwen3_code2wav import AudioChunk
from omni.engine.qwen3_stream import (
    CodecFrame,
    Qwen3OmniStreamer,
    StreamOptions,
    TextToken,
)

SAMPLE_RATE = 24000
# the streamed waveform against generate()'s, max abs difference (float32 rounding of the
# same Code2Wav over a window instead of the whole reply)
WAV_TOLERANCE = 1e-6


@dataclass
class Reply:
    text_ids: list[int]
    codes: torch.Tensor  # (16, frames)
    wav: torch.Tensor  # (samples,)


@dataclass
class Qwen3Bench:
    sessions: int
    streamed: PathResult
    reference: PathResult
    matches_reference: bool


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


def matches(streamed: Reply, reference: Reply) -> bool:
    return (
        streamed.text_ids == reference.text_ids
        and torch.equal(streamed.codes, reference.codes)
        and streamed.wav.shape == reference.wav.shape
        and bool((streamed.wav - reference.wav).abs().max() <= WAV_TOLERANCE)
    )


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
    json_path: Path | None = None,
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
    bench = Qwen3Bench(
        sessions=1,
        streamed=streamed_timing,
        reference=_timing(start, None, None, total, reference.wav.numel()),
        matches_reference=matches(streamed, reference),
    )
    print(table(bench))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(bench), indent=2))
        print(f"wrote {json_path}")
    return bench


def table(bench: Qwen3Bench) -> str:
    lines = path_table({"streamed": bench.streamed, "reference": bench.reference})
    lines.append(f"matches_reference: {bench.matches_reference}")
    return "\n".join(lines)
