"""The transcriber: its messages, the tiny Whisper checkpoint, checkpoint resolution, and the
real worker process on the tiny checkpoint (streamed text, a bad item, the queue bound, a
crash and its restart, death with the front end)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from realtime_helpers import speech
from test_engine_parent_death import assert_workers_die_with_their_front_end
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.whisper import TINY_WHISPER, resolve_transcriber
from omni.engine import protocol as p
from omni.engine.transcriber import (
    QUEUE_FULL,
    QUEUE_LIMIT_SETTING,
    WORKER_LOST,
    Transcriber,
    TranscriberOptions,
    TranscriptionDelta,
    TranscriptionDone,
    TranscriptionEvent,
)

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the module's one transcriber


def spoken(text: str = "Hello there, how are you?") -> np.ndarray:
    """espeak-ng speech as float32 16 kHz."""
    return np.frombuffer(speech(text, 16_000), np.int16).astype(np.float32) / 32768


@pytest.fixture(scope="module")
def tiny_whisper() -> Path:
    resolved = resolve_transcriber("auto", main_is_tiny=True)
    assert resolved is not None and resolved.is_tiny and resolved.name == TINY_WHISPER
    return resolved.path


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def transcriber(tiny_whisper: Path) -> AsyncIterator[Transcriber]:
    options = TranscriberOptions(str(tiny_whisper), queue_max=2, allow_faults=True)
    async with Transcriber(options) as running:
        yield running


async def collect(events: AsyncIterator[TranscriptionEvent]) -> tuple[list[str], TranscriptionDone]:
    deltas: list[str] = []
    async for event in events:
        if isinstance(event, TranscriptionDelta):
            deltas.append(event.text)
        else:
            return deltas, event
    raise AssertionError("no TranscriptionDone")


def test_messages_round_trip_with_their_audio() -> None:
    pcm = np.linspace(-1, 1, 1600, dtype=np.float32)
    sent = p.Transcribe("r1", p.Array.of(pcm), "en", "names: Ada")
    got = p.decode(p.encode(sent))
    assert isinstance(got, p.Transcribe) and (got.language, got.prompt) == ("en", "names: Ada")
    assert np.array_equal(got.pcm.numpy(), pcm)
    for msg in (p.TranscriptDelta("r1", "Hel"), p.TranscriptDone("r1", "failed", "", "why")):
        assert p.decode(p.encode(msg)) == msg


def test_the_tiny_whisper_is_a_real_whisper_checkpoint(tiny_whisper: Path) -> None:
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    processor = WhisperProcessor.from_pretrained(tiny_whisper)
    tokenizer = processor.tokenizer
    config = model.generation_config
    assert config.lang_to_id["<|en|>"] == tokenizer.convert_tokens_to_ids("<|en|>")
    assert config.no_timestamps_token_id == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("Hello there", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "Hello there" and len(ids) < len("Hello there")
    features = processor.feature_extractor(spoken(), sampling_rate=16_000, return_tensors="pt")
    out = model.generate(features.input_features, language="en", task="transcribe")
    assert out.shape[1] > 1  # it says something: random words, but real generation


def test_transcriber_models_resolve_or_say_what_is_missing(
    tiny_whisper: Path, tmp_path: Path
) -> None:
    assert resolve_transcriber("none", main_is_tiny=True) is None
    local = resolve_transcriber(str(tiny_whisper), main_is_tiny=False)
    assert local is not None and local.path == tiny_whisper and not local.is_tiny
    (tmp_path / "config.json").write_text((tiny_whisper / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no Whisper weights"):
        resolve_transcriber(str(tmp_path), main_is_tiny=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    with pytest.raises(CheckpointError, match="not Whisper"):
        resolve_transcriber(str(tmp_path), main_is_tiny=True)
    with pytest.raises(CheckpointError, match="neither"):
        resolve_transcriber("no such thing", main_is_tiny=True)


@in_module_loop
async def test_text_streams_in_deltas_and_completes(transcriber: Transcriber) -> None:
    deltas, done = await collect(transcriber.transcribe(spoken(), "en", "Ada, Grace"))
    assert done.status == "completed" and done.error is None
    assert deltas and all(deltas) and done.transcript == "".join(deltas)
    # over 30 s goes in 30 s windows, each one streamed
    thirty_one_s = np.zeros(16_000 * 31, np.float32)
    long_deltas, long_done = await collect(transcriber.transcribe(thirty_one_s))
    assert long_done.status == "completed" and long_done.transcript == "".join(long_deltas)
    assert len(long_deltas) > len(deltas)
    assert transcriber.pending == 0


@in_module_loop
async def test_a_bad_item_fails_alone(transcriber: Transcriber) -> None:
    # the session checks languages; the worker must still survive one it does not know
    _, bad = await collect(transcriber.transcribe(spoken(), "xx"))
    assert bad.status == "failed" and bad.error and "xx" in bad.error
    _, good = await collect(transcriber.transcribe(spoken()))
    assert good.status == "completed" and transcriber.restarts == 0


@in_module_loop
async def test_an_item_past_the_queue_bound_fails_at_once_naming_the_limit(
    transcriber: Transcriber,
) -> None:
    transcriber.hold()
    try:
        queued = [transcriber.transcribe(spoken()) for _ in range(2)]
        waiting = [asyncio.create_task(collect(events)) for events in queued]
        while transcriber.pending < 2:
            await asyncio.sleep(0.01)
        _, refused = await collect(transcriber.transcribe(spoken()))
        assert refused.status == "failed" and refused.code == QUEUE_FULL
        assert refused.error and QUEUE_LIMIT_SETTING in refused.error
        assert not any(task.done() for task in waiting)
    finally:
        transcriber.release()
    for task in waiting:
        assert (await task)[1].status == "completed"


@in_module_loop
async def test_a_crash_fails_the_pending_items_and_the_worker_restarts(
    transcriber: Transcriber,
) -> None:
    transcriber.inject_fault("crash", after_steps=2)
    _, lost = await collect(transcriber.transcribe(spoken()))
    assert lost.status == "failed" and lost.code == WORKER_LOST
    assert lost.error and "died" in lost.error
    assert transcriber.restarts == 1
    _, after = await collect(transcriber.transcribe(spoken()))  # the restarted worker
    assert after.status == "completed"


FRONT_END = """
import asyncio, sys
from omni.engine.transcriber import Transcriber, TranscriberOptions

async def main():
    transcriber = Transcriber(TranscriberOptions(sys.argv[1]))
    await transcriber.start()
    print([transcriber._proc.pid], flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


def test_the_worker_exits_when_its_front_end_is_killed(tiny_whisper: Path) -> None:
    assert_workers_die_with_their_front_end(FRONT_END, tiny_whisper, workers=1)
