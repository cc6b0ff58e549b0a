"""Streamed replies equal transformers' generate(), token for token (greedy).

One conversation through the real worker processes on the tiny checkpoint, one turn per
input kind: text, audio, image + text, and a video with its audio. After each turn the
reference runs generate() on the conversation so far and must produce the same text tokens
and the same codec tokens.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.bench.reference import ReferenceConversation
from omni.checkpoints.processor import load_processor
from omni.engine.api import ReplyDone, ReplyOptions, SessionOptions
from omni.engine.engine import EngineConfig, OmniEngine

TEXT_TOKENS = 10
CODEC_TOKENS = 40


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Amplitude-modulated noise with its loudest moment in the first 2 seconds.

    The streamed log-mel clamps each frame with the running maximum, the offline one with the
    clip's maximum; they are equal when the maximum comes first (test_audio_features covers
    the general case).
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    envelope = 0.3 + 0.25 * np.sin(2 * np.pi * 3.0 * t) ** 2
    audio = rng.standard_normal(n) * envelope * 0.3
    audio[1600:2400] *= 3.0  # a loud syllable at 0.1 s
    return audio.astype(np.float32)


def picture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


async def run_turn(engine: OmniEngine, session: str) -> ReplyDone:
    done = None
    async for event in engine.respond(
        session,
        ReplyOptions(greedy=True, max_text_tokens=TEXT_TOKENS, max_codec_tokens=CODEC_TOKENS),
    ):
        if isinstance(event, ReplyDone):
            done = event
    assert done is not None and done.status == "completed", done
    return done


def test_streamed_tokens_equal_generate(tiny_checkpoint):
    torch.manual_seed(0)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    reference = ReferenceConversation(model, load_processor(tiny_checkpoint))
    audio1 = speech_like(3.3, seed=1)
    audio2 = speech_like(5.3, seed=2)
    image = picture(120, 160, seed=3)
    frames = [picture(96, 128, seed=10 + i) for i in range(12)]

    async def conversation() -> list[ReplyDone]:
        engine = OmniEngine(EngineConfig(model_path=str(tiny_checkpoint)))
        await engine.start()
        try:
            await engine.open_session("s", SessionOptions())
            replies = []
            await engine.add_text("s", "Hello! What can you do?")
            replies.append(await run_turn(engine, "s"))
            for piece in np.array_split(audio1, 17):  # uneven pieces, as a network delivers them
                await engine.append_audio("s", piece)
            replies.append(await run_turn(engine, "s"))
            await engine.add_image("s", image)
            await engine.add_text("s", "What is in this picture?")
            replies.append(await run_turn(engine, "s"))
            for frame in frames:
                await engine.append_video_frame("s", frame)
            for piece in np.array_split(audio2, 23):
                await engine.append_audio("s", piece)
            replies.append(await run_turn(engine, "s"))
            return replies
        finally:
            await engine.stop()

    streamed = asyncio.run(conversation())

    turns = [
        dict(text="Hello! What can you do?"),
        dict(audio=audio1),
        dict(image=image, text="What is in this picture?"),
        dict(audio=audio2, video_frames=frames),
    ]
    for i, (turn, got) in enumerate(zip(turns, streamed)):
        reference.user_turn(**turn)
        want = reference.generate(max_text_tokens=TEXT_TOKENS, max_codec_tokens=CODEC_TOKENS)
        assert got.text_token_ids == want.text_ids, f"turn {i}: text tokens differ"
        assert got.codec_tokens == want.codes, f"turn {i}: codec tokens differ"
        assert got.audio_samples == len(want.codes) * 480
        reference.add_reply(want.text_ids)
