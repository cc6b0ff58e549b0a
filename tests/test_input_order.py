"""Input lands where the chat template puts it: the engine's tokens for a turn of mixed
speech, text and an image equal the processor's chat template for the same parts in order.

Text or an image that comes while speech streams in closes the open audio span first (it
would otherwise land between `<|audio_bos|>` and `<|audio_eos|>`); speech after it is a span
of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import thinker_conversation

from omni.checkpoints.parts import load_thinker
from omni.engine.kv_memory import KVSlots
from omni.engine.thinker_family import SPEECH_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def thinker(tiny_checkpoint):
    torch.set_grad_enabled(False)
    yield load_thinker(tiny_checkpoint)
    torch.set_grad_enabled(True)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(
        np.float32
    )


def test_mixed_input_follows_the_chat_template(thinker) -> None:
    first, second = speech_like(2.4, seed=1), speech_like(1.2, seed=2)
    image = np.full((56, 84, 3), 120, np.uint8)
    kv = KVSlots.for_model(thinker.model.config.text_config, 1, 4096, "cpu", torch.float32)
    conv = thinker_conversation(thinker.model.eval(), thinker.processor, lambda rows: None, kv)
    # speech streams in; text is typed and an image sent while the caller still talks
    for piece in np.array_split(first, 7):
        conv.append_audio(piece)
    conv.add_text("What is in this picture?")
    conv.add_image(image)
    for piece in np.array_split(second, 3):
        conv.append_audio(piece)
    conv.end_turn()

    messages = [
        {"role": "system", "content": SPEECH_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "audio"},
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image"},
                {"type": "audio"},
            ],
        },
    ]
    prompt = thinker.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    expected = thinker.processor(
        text=[prompt], audio=[first, second], images=[image], return_tensors="pt"
    )["input_ids"][0].tolist()
    assert conv.token_ids == expected
    conv.close()


def test_text_after_committed_speech_is_not_inside_its_span(thinker) -> None:
    """The usual order: speech (committed), then a typed item: the text follows the span."""
    kv = KVSlots.for_model(thinker.model.config.text_config, 1, 4096, "cpu", torch.float32)
    conv = thinker_conversation(thinker.model.eval(), thinker.processor, lambda rows: None, kv)
    conv.append_audio(speech_like(1.0, seed=3))
    conv.add_text("And this too.")
    conv.end_turn()
    ids = conv.ids
    tokens = conv.token_ids
    audio_eos = tokens.index(ids.audio_eos)
    text = thinker.processor.tokenizer.encode("And this too.", add_special_tokens=False)
    assert tokens[audio_eos + 1 : audio_eos + 1 + len(text)] == text
    assert tokens.count(ids.audio_bos) == tokens.count(ids.audio_eos) == 1
    conv.close()
