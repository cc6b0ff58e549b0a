"""Qwen3-Omni through the engine's real worker processes (thinker, talker + code predictor,
Code2Wav) on the tiny checkpoint, against `Qwen3OmniMoeForConditionalGeneration.generate()`.

Three sessions talk at once (so the stages batch them), with turns of text, of speech and
of an image;
after each turn the reference runs generate() on that session's conversation so far, built by
the processor and the chat template (omni/bench/reference.py builds the prompt; the engine
builds its own from the same turns, so shared code ends at the tokenizer and feature
extractor). Greedy text tokens, every codebook's codes and the 24 kHz waveform (int16 on the
wire) must be generate()'s. A fourth session talks on camera (a video with its audio):
generate()'s talker cannot take audio and video positions in one prompt (its get_rope_index
reads an audio_config its talker config lacks), so that reply's text is checked against the
thinker's generate() alone, and its speech for being there. Then what a session does
besides: barge-in, truncation to what was heard, and a context budget.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from test_engine_reference import picture, speech_like
from test_qwen3_thinker import VIDEO_FRAMES, VIDEO_SPEECH, video_reference, video_turn

from omni.bench.qwen3 import WAV_TOLERANCE, wav_error
from omni.bench.reference import ReferenceConversation
from omni.checkpoints.parts import load_thinker, load_whole
from omni.checkpoints.processor import load_processor
from omni.engine.api import (
    AudioChunk,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
    TextDelta,
)
from omni.engine.engine import EngineConfig, OmniEngine

TEXT_TOKENS = 10
BUDGET = 200  # context tokens of the budget test's session
FRAMES = 24
CODEBOOKS = 16
# the reference's tolerance plus int16's step on the wire (full scale here)
WIRE_TOLERANCE = WAV_TOLERANCE + 1 / 32767


def _options(**kwargs) -> ReplyOptions:
    settings = dict(greedy=True, max_text_tokens=TEXT_TOKENS, max_codec_tokens=FRAMES, voice="Ethan")
    return ReplyOptions(**(settings | kwargs))


async def _reply(engine: OmniEngine, session: str, options: ReplyOptions | None = None):
    done, audio = None, []
    async for event in engine.respond(session, options or _options()):
        if isinstance(event, AudioChunk):
            assert event.first_sample == sum(a.size for a in audio)
            audio.append(event.pcm)
        elif isinstance(event, ReplyDone):
            done = event
    assert done is not None
    pcm = np.concatenate(audio) if audio else np.zeros(0, np.int16)
    return done, torch.from_numpy(pcm.astype(np.float32) / 32767)


def _engine(checkpoint, **config) -> OmniEngine:
    config = {"kv_slots": 4, "max_context_tokens": 4096} | config
    return OmniEngine(EngineConfig(model_path=str(checkpoint), **config))


TURNS = {
    "a": [dict(text="Hello there! What can you do?"), dict(audio=speech_like(10.5, seed=1))],
    "b": [dict(audio=speech_like(3.3, seed=2)), dict(text="Tell me a story about the sea.")],
    # no speech with the image: generate()'s talker cannot place audio and image positions
    # in one prompt (its get_rope_index reads an audio_config its talker config lacks)
    "c": [
        dict(image=picture(120, 160, seed=3), text="What is in this picture?"),
        dict(text="And what colour is it?"),
    ],
}


async def _send(engine: OmniEngine, session: str, turn: dict) -> None:
    if "image" in turn:
        await engine.add_image(session, turn["image"])
    if "audio" in turn:
        for piece in np.array_split(turn["audio"], 13):  # uneven pieces, as a network sends
            await engine.append_audio(session, piece)
    if "text" in turn:
        await engine.add_text(session, turn["text"])


def test_three_sessions_at_once_equal_generate(tiny_qwen3_checkpoint):
    async def calls() -> dict[str, list]:
        engine = _engine(tiny_qwen3_checkpoint)
        await engine.start()
        try:
            for session in TURNS:
                await engine.open_session(session, SessionOptions(voice="Ethan"))
            await engine.open_session("v", SessionOptions(voice="Ethan"))
            got: dict[str, list] = {session: [] for session in TURNS}
            for index in range(2):
                for session, turns in TURNS.items():
                    await _send(engine, session, turns[index])
                if index == 0:
                    for kind, data in video_turn():
                        send = engine.append_video_frame if kind == "frame" else engine.append_audio
                        await send("v", data)
                    video = asyncio.create_task(_reply(engine, "v"))
                replies = await asyncio.gather(*(_reply(engine, s) for s in TURNS))
                for session, reply in zip(TURNS, replies):
                    got[session].append(reply)
            got["v"] = [await video]
            return got
        finally:
            await engine.stop()

    streamed = asyncio.run(calls())

    (done, wav), = streamed.pop("v")
    assert done.status == "completed" and wav.numel() > 0, done.error
    thinker = load_thinker(tiny_qwen3_checkpoint)
    reference, prompt = video_reference(thinker, VIDEO_SPEECH, VIDEO_FRAMES)
    assert done.text_token_ids == reference.sequences[0, len(prompt) :].tolist()

    model = load_whole(tiny_qwen3_checkpoint)
    processor = load_processor(tiny_qwen3_checkpoint)
    replies = set()
    for session, turns in TURNS.items():
        reference = ReferenceConversation(model, processor)
        for index, (turn, (done, wav)) in enumerate(zip(turns, streamed[session])):
            reference.user_turn(**turn)
            want = reference.generate("Ethan", max_text_tokens=TEXT_TOKENS, max_codec_tokens=FRAMES)
            where = f"session {session}, turn {index}"
            assert done.status == "completed", (where, done.error)
            assert done.text_token_ids == want.text_ids, where
            assert done.codec_tokens == want.codes, where
            assert len(done.codec_tokens) > 4 * CODEBOOKS, where
            expected = torch.from_numpy(want.wav).clamp(-1, 1)
            assert wav_error(wav, expected) < WIRE_TOLERANCE, where
            assert done.audio_samples == wav.numel() == expected.numel(), where
            replies.add(tuple(done.text_token_ids))
            reference.add_reply(want.text_ids)
    assert len(replies) == 6  # every turn has a reply of its own: the evidence can fail


def test_barge_in_truncation_and_the_context_budget(tiny_qwen3_checkpoint):
    errors: list[str] = []

    async def on_error(message: str) -> None:
        errors.append(message)

    async def call() -> None:
        # a small budget, so a few turns reach it: old content is evicted from the thinker's
        # and the talker's KV (thinker.py, qwen3_talker.py) and the call goes on
        engine = _engine(tiny_qwen3_checkpoint, context_budget_tokens=BUDGET, reply_reserve_tokens=256)
        await engine.start()
        try:
            await engine.open_session("s", SessionOptions(voice="Chelsie", on_error=on_error))
            await engine.add_text("s", "Hello there! What can you do?")
            # barge-in: cancelled at its first audio, the reply stops and keeps what it said
            events = []
            async for event in engine.respond("s", _options(voice=None, max_text_tokens=40)):
                events.append(event)
                if isinstance(event, AudioChunk) and sum(isinstance(e, AudioChunk) for e in events) == 1:
                    await engine.cancel("s")
            done = events[-1]
            assert isinstance(done, ReplyDone) and done.status == "cancelled"
            assert any(isinstance(e, TextDelta) for e in events)
            # what was heard: none of it, then the next turn goes on from the cut
            assert await engine.truncate_reply("s", 0) == 0
            await engine.add_text("s", "Say that again.")
            again, wav = await _reply(engine, "s")
            assert again.status == "completed" and wav.numel() > 0
            await engine.append_audio("s", speech_like(1.0, seed=3))
            spoken, wav = await _reply(engine, "s")
            assert spoken.status == "completed" and wav.numel() > 0
            # past the budget: every turn is still answered, with speech
            said = 0  # tokens these turns add: more than the whole budget
            for turn in range(6):
                await engine.add_text("s", f"Tell me more, part {turn}, about the long coast road.")
                more, wav = await _reply(engine, "s")
                assert more.status == "completed" and wav.numel() > 0, more.error
                said += more.input_tokens + more.text_tokens
            assert said > BUDGET
            await asyncio.sleep(0.5)  # a heartbeat reports the context
            assert 0 < engine.context_tokens["s"] <= BUDGET
            # an unknown voice names the known ones
            unknown, _ = await _reply(engine, "s", _options(voice="Nobody"))
            assert unknown.status == "failed" and "Ethan" in (unknown.error or "")
            assert errors == []
        finally:
            await engine.stop()

    asyncio.run(call())
