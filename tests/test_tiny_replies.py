"""The tiny checkpoint's greedy replies depend on their input (transformers' generate()).

"Streamed tokens equal generate()" is only evidence if generate()'s tokens carry the input:
a model that answers everything with one repeated token agrees with any engine that gets the
prompt roughly right. So different texts and different audio clips must give different
replies, each of several distinct tokens, and the talker's codes must follow within a few
codes. An image goes with one turn too.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.bench.reference import ReferenceConversation, ReferenceReply
from omni.checkpoints.processor import load_processor

TEXT_TOKENS = 24
CODES = 5
SAMPLE_RATE = 16000


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(
        np.float32
    )


def gradient(height: int, width: int) -> np.ndarray:
    """A left-to-right grey ramp, RGB."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    return np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)


TURNS = {
    "text: greeting": dict(text="Hello! What can you do?"),
    "text: question": dict(text="What is the capital of France?"),
    "text: request": dict(text="Tell me a long story."),
    "audio: 440 Hz tone": dict(audio=tone(2.0, 440.0)),
    "audio: white noise": dict(audio=noise(2.0, seed=0)),
    "image and text": dict(image=gradient(84, 140), text="What is in this picture?"),
}


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Qwen2_5OmniForConditionalGeneration:
    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def replies(
    tiny_checkpoint: Path, model: Qwen2_5OmniForConditionalGeneration
) -> dict[str, ReferenceReply]:
    processor = load_processor(tiny_checkpoint)
    out = {}
    with torch.no_grad():
        for name, turn in TURNS.items():
            reference = ReferenceConversation(model, processor)
            reference.user_turn(**turn)
            out[name] = reference.generate(max_text_tokens=TEXT_TOKENS, max_codec_tokens=CODES)
    return out


def test_greedy_replies_are_several_distinct_tokens(replies: dict[str, ReferenceReply]) -> None:
    for name, reply in replies.items():
        # a few tokens at least before any eos (tests that need long replies set min_text_tokens)
        assert len(reply.text_ids) >= 8, (name, reply.text_ids)
        assert len(set(reply.text_ids)) >= 3, (name, reply.text_ids)


def test_different_inputs_get_different_replies(replies: dict[str, ReferenceReply]) -> None:
    for a, b in combinations(replies, 2):
        assert replies[a].text_ids != replies[b].text_ids, (a, b)


def test_talker_codes_follow_the_input_within_five_codes(
    replies: dict[str, ReferenceReply],
) -> None:
    for name, reply in replies.items():
        assert len(reply.codes) == CODES, name
    for a, b in combinations(replies, 2):
        assert replies[a].codes != replies[b].codes, (a, b)

