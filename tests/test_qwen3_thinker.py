"""The Qwen3-Omni thinker in the engine's batched stage against transformers, on the tiny
checkpoint (fp32, CPU): the conversation streamed in as it arrives (text, user speech in
`n_window_infer` chunks) gives generate()'s greedy reply token for token and its logits, and
the context rows it sends the talker are what generate() hands Qwen3-Omni's talker (the input
embedding of a text token, the `accept_hidden_layer` state of an audio one).
The reference is the whole model's `thinker.generate()` on the processor's prompt: it shares
no code with the stage (the stage calls transformers' decoder stack, not its generate())."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import thinker_conversation
from test_engine_reference import picture
from omni.checkpoints.parts import load_thinker
from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.scheduler import StepScheduler
from omni.engine.thinker import ThinkerStage

LOGITS_TOLERANCE = 1e-4
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def parts(tiny_qwen3_checkpoint):
    parts = load_thinker(tiny_qwen3_checkpoint)
    parts.model.eval()
    return parts


def _speech(seconds: float, seed: int) -> np.ndarray:
    """Voiced-sounding audio: a few harmonics with a wobble, and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    wave = sum(np.sin(k * phase) / k for k in range(1, 5)) * 0.2
    return (wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _streamed(parts, turn):
    """Run one user turn through ThinkerConversation + ThinkerStage; returns the reply's
    tokens and logits, the prompt ids, and every context row sent (in order)."""
    rows: list[ContextRows] = []
    kv = KVSlots.for_model(parts.model.config.text_config, 2, 2048, torch.device("cpu"), torch.float32)
    stage = ThinkerStage(parts.model, kv, StepScheduler(96, 4), talker_layer=parts.talker_layer)
    conv = thinker_conversation(parts.model, parts.processor, rows.append, kv)
    turn(conv)
    conv.end_turn()
    reply = conv.start_reply(MAX_TOKENS, greedy=True)
    prompt = conv.token_ids
    logits = []
    with torch.no_grad():
        while not reply.done:
            stage.drain({"s": conv})
            logits.append(reply.logits.clone())
            conv.choose()
    return reply.tokens, logits, prompt, rows


def _reference(parts, text: str | None, audio: np.ndarray | None, image: np.ndarray | None):
    processor = parts.processor
    content = (
        ([{"type": "image"}] if image is not None else [])
        + ([{"type": "audio"}] if audio is not None else [])
        + ([{"type": "text", "text": text}] if text is not None else [])
    )
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    batch = processor(
        text=[prompt],
        audio=[audio] if audio is not None else None,
        images=[image] if image is not None else None,
        return_tensors="pt",
    )
    media = {}
    if audio is not None:
        media = {k: batch[k] for k in ("input_features", "feature_attention_mask")}
    if image is not None:
        media |= {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        out = parts.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=[151645, 151643],
            output_logits=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
            **media,
        )
    ids = batch["input_ids"][0].tolist()
    return out, ids


TURNS = {
    "text": ("Tell me about the weather on the coast today.", None, False),
    "other text": ("Count the colours of a rainbow.", None, False),
    "speech": (None, 10.5, False),  # one whole 8 s window, then a tail, then the turn's end
    # an image: its features go in at the input and (deepstack) into the first layers
    "image": ("What is in this picture?", None, True),
}


@pytest.mark.parametrize("name", list(TURNS))
def test_reply_and_logits_equal_generate(parts, name):
    text, seconds, with_image = TURNS[name]
    audio = _speech(seconds, seed=1) if seconds else None
    image = picture(120, 160, seed=3) if with_image else None

    def turn(conv):
        if image is not None:
            conv.add_image(image)
        if audio is not None:
            for piece in np.array_split(audio, 17):  # as a call's audio frames arrive
                conv.append_audio(piece)
        if text is not None:
            conv.add_text(text)

    tokens, logits, prompt, rows = _streamed(parts, turn)
    reference, reference_prompt = _reference(parts, text, audio, image)
    assert prompt == reference_prompt
    generated = reference.sequences[0, len(reference_prompt) :].tolist()
    assert tokens == generated
    assert len(set(tokens)) > 2  # the tiny checkpoint's replies depend on the input
    for step, (mine, theirs) in enumerate(zip(logits, reference.logits)):
        assert (mine - theirs[0].float()).abs().max() < LOGITS_TOLERANCE, step

    # the rows: embedding of text tokens, accept-layer state of audio ones, for the prompt
    # and every reply token the thinker ran (all but the last)
    sent = torch.cat([piece.rows for piece in rows])
    ids = torch.cat([piece.token_ids for piece in rows])
    assert ids.tolist() == (prompt + tokens[:-1])
    layer = parts.talker_layer
    prefill = reference.hidden_states[0]
    embeds = torch.cat([prefill[0]] + [h[0] for h in reference.hidden_states[1:]], dim=1)[0]
    accept = torch.cat([prefill[layer]] + [h[layer] for h in reference.hidden_states[1:]], dim=1)[0]
    config = parts.model.config
    media_rows = (ids == config.audio_token_id) | (ids == config.image_token_id)
    expected = torch.where(media_rows[:, None], accept, embeds)
    assert (sent - expected).abs().max() < LOGITS_TOLERANCE
    assert media_rows.any() == (audio is not None or image is not None)


def test_two_turns_differ(parts):
    first, *_ = _streamed(parts, lambda conv: conv.add_text(TURNS["text"][0]))
    second, *_ = _streamed(parts, lambda conv: conv.add_text(TURNS["other text"][0]))
    assert first != second


def test_camera_frames_are_refused_with_a_clear_error(parts):
    kv = KVSlots.for_model(parts.model.config.text_config, 1, 256, torch.device("cpu"), torch.float32)
    conv = thinker_conversation(parts.model, parts.processor, lambda rows: None, kv)
    with pytest.raises(ValueError, match="camera frames are not served for Qwen3-Omni"):
        conv.append_video_frame(np.zeros((32, 32, 3), np.uint8))
