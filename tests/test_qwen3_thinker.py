"""The Qwen3-Omni thinker in the engine's batched stage against transformers, on the tiny
checkpoint (fp32, CPU): the conversation streamed in as it arrives (text, user speech in
`n_window_infer` chunks) gives generate()'s greedy reply token for token and its logits, and
the context rows it sends the talker are what generate() hands Qwen3-Omni's talker (the input
embedding of a text token, the `accept_hidden_layer` state of an audio one).
The reference is the whole model's `thinker.generate()` on the processor's prompt: it shares
no code with the stage (the stage calls transformers' decoder stack, not its generate())."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engine_helpers import thinker_conversation
from test_engine_reference import picture
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    _get_feat_extract_output_lengths,
)
from omni.bench.reference import interleave_video_audio
from omni.checkpoints.parts import load_thinker
from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.scheduler import StepScheduler
from omni.engine.thinker import ThinkerStage
from omni.engine.vision import VideoPatcher

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


VIDEO_SPEECH = _speech(10.5, seed=2)
VIDEO_FRAMES = [picture(96, 128, seed=20 + i) for i in range(22)]  # 2 a second


def video_turn() -> Iterator[tuple[str, np.ndarray]]:
    """A caller on camera, as a call delivers it: ("frame", rgb) and ("audio", pcm) in order,
    two frames before the speech (they make it a video), then two after each speech piece."""
    for frame in VIDEO_FRAMES[:2]:
        yield "frame", frame
    for i, piece in enumerate(np.array_split(VIDEO_SPEECH, 21)):
        yield "audio", piece
        for frame in VIDEO_FRAMES[2 * i + 2 : 2 * i + 4]:
            yield "frame", frame


def video_reference(parts, audio: np.ndarray, frames: list[np.ndarray]):
    """generate() on one user turn of a video with its audio. The prompt is the chat
    template's, its video placeholder expanded by the processor's own interleaving
    (`replace_video_with_audio_token`); the frames are patched by the engine's VideoPatcher
    (shared code: the processor's video path needs torchvision, absent here)."""
    processor = parts.processor
    patcher = VideoPatcher(448, processor.image_processor.to_dict())
    steps = [s for s in map(patcher.push, frames) if s is not None]
    grid = torch.tensor([[len(steps), *steps[0].grid_thw[1:]]])
    feats = processor.feature_extractor(
        audio, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
        return_tensors="pt",
    )  # fmt: skip
    n_audio = int(_get_feat_extract_output_lengths(torch.tensor(audio.size // 160), 50))
    placeholder = interleave_video_audio(
        processor,
        {"video_grid_thw": grid, "video_second_per_grid": [1.0]},
        {"num_audio_tokens": [n_audio]},
        patcher.merge_size,
        position_id_per_seconds=parts.model.config.position_id_per_seconds,
    )
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}]}], add_generation_prompt=True, tokenize=False
    ).replace(processor.video_token, placeholder)
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = parts.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=feats["input_features"],
            feature_attention_mask=feats["attention_mask"],
            pixel_values_videos=torch.from_numpy(np.concatenate([s.pixel_values for s in steps])),
            video_grid_thw=grid,
            video_second_per_grid=torch.tensor([1.0]),
            use_audio_in_video=True,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=[151645, 151643],
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out, ids[0].tolist()


def test_a_video_with_its_audio_equals_generate(parts):
    """Camera frames while the caller talks: each grid step (2 frames, 1 s) goes before the
    audio token at its start time, 13 positions a second, with the audio in 8 s windows."""

    def turn(conv):
        for kind, data in video_turn():
            (conv.append_video_frame if kind == "frame" else conv.append_audio)(data)

    tokens, logits, prompt, _ = _streamed(parts, turn)
    reference, reference_prompt = video_reference(parts, VIDEO_SPEECH, VIDEO_FRAMES)
    assert prompt == reference_prompt
    assert tokens == reference.sequences[0, len(reference_prompt) :].tolist()
    for step, (mine, theirs) in enumerate(zip(logits, reference.logits)):
        assert (mine - theirs[0].float()).abs().max() < LOGITS_TOLERANCE, step
