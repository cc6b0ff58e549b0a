"""A worker restart keeps each call's conversation: rebuilt from the engine's replay log, the
next greedy reply is the one an engine that never crashed gives. Real workers, tiny checkpoint.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from omni.engine.api import ReplyDone, ReplyOptions, SessionOptions
from omni.engine.engine import EngineConfig, running_engine

TEXT_ONLY = ReplyOptions(greedy=True, output_audio=False, max_text_tokens=6)
SPOKEN = ReplyOptions(greedy=True, max_text_tokens=6, max_codec_tokens=20)


async def reply(engine, options: ReplyOptions) -> ReplyDone:
    async for event in engine.respond("s", options):
        if isinstance(event, ReplyDone):
            assert event.status == "completed", event.error
            return event
    raise AssertionError("respond() ended without ReplyDone")


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Noise with a syllable-rate envelope: any audio the encoder turns into tokens will do."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.1 * noise * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


async def conversation(checkpoint: Path, crash: bool) -> tuple[list[ReplyDone], int, list[str]]:
    """A text turn, a spoken turn (its reply truncated to what was heard), and a third turn;
    with `crash`, the thinker dies during the third turn's input."""
    notices: list[str] = []

    async def on_error(message: str) -> None:
        notices.append(message)

    config = EngineConfig(str(checkpoint), allow_faults=True)
    async with running_engine(config) as engine:
        await engine.open_session("s", SessionOptions(instructions="Be brief.", on_error=on_error))
        await engine.add_text("s", "Hello there, who are you?")
        first = await reply(engine, TEXT_ONLY)
        audio = speech_like(2.5, seed=1)
        for chunk in np.array_split(audio, 5):
            await engine.append_audio("s", chunk)
        second = await reply(engine, SPOKEN)
        kept = await engine.truncate_reply("s", audio_ms=400)  # all 20 codes heard
        if crash:
            engine.inject_fault("thinker", "crash")  # on its next step: the audio below
        await engine.append_audio("s", speech_like(0.5, seed=2))
        await engine.add_text("s", "And then?")
        while crash and (engine.restarts == 0 or not engine.ready):
            await asyncio.sleep(0.05)
        third = await reply(engine, SPOKEN)
    return [first, second, third], kept, notices


def test_conversation_survives_a_thinker_crash(tiny_checkpoint: Path) -> None:
    crashed, kept, notices = asyncio.run(conversation(tiny_checkpoint, crash=True))
    reference, reference_kept, _ = asyncio.run(conversation(tiny_checkpoint, crash=False))
    # what happened before the crash is untouched
    for before, same in zip(crashed[:2], reference[:2]):
        assert before.text_token_ids == same.text_token_ids
        assert before.codec_tokens == same.codec_tokens
    assert kept == reference_kept > 0
    # the rebuilt conversation gives the reply the uncrashed one gives: text, and speech (the
    # talker's context came back from the thinker's replayed rows)
    after, expected = crashed[2], reference[2]
    assert after.input_tokens == expected.input_tokens
    assert after.text_token_ids == expected.text_token_ids
    assert after.codec_tokens == expected.codec_tokens
    assert len(notices) == 1 and "the thinker worker died" in notices[0]
    assert "rebuild this conversation" in notices[0]
