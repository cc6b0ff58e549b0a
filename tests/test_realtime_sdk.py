"""The official openai SDK, unchanged, against the server: spoken turns, barge-in, images,
text, memory and ephemeral keys. Reply content is only checked for the fake engine."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fake_engine import FakeEngine
from realtime_helpers import (
    TIMEOUT,
    RunningServer,
    b64,
    chunks,
    data_url,
    image_bytes,
    silence,
    speech,
)

QUESTION = "What is the capital of France?"

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory
ENGINES = ("fake", "tiny")  # the scripted fake, and the real worker processes on the tiny checkpoint


async def collect(conn: Any, until: str) -> list[Any]:
    """Server events up to and including the first `until`."""
    events: list[Any] = []

    async def run() -> list[Any]:
        while True:
            events.append(await conn.recv())
            if events[-1].type == until:
                return events

    return await asyncio.wait_for(run(), TIMEOUT)


async def speak(conn: Any, text: str, trailing_ms: int = 1000) -> None:
    for chunk in chunks(silence(300) + speech(text) + silence(trailing_ms)):
        await conn.input_audio_buffer.append(audio=b64(chunk))


def first(events: list[Any], kind: str) -> int:
    return next(i for i, e in enumerate(events) if e.type == kind)


async def test_spoken_question_gets_a_spoken_answer(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen2.5-omni") as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.audio.output.voice == "Chelsie"
        await speak(conn, QUESTION)
        events = await collect(conn, "response.done")
    kinds = [e.type for e in events]
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.output_audio_transcript.delta",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.done",
    ]
    assert [first(events, k) for k in order] == sorted(first(events, k) for k in order), kinds
    assert "error" not in kinds
    started, stopped = (
        events[first(events, "input_audio_buffer.speech_started")],
        events[first(events, "input_audio_buffer.speech_stopped")],
    )
    assert started.item_id == stopped.item_id and 0 <= started.audio_start_ms < stopped.audio_end_ms
    assert events[first(events, "input_audio_buffer.committed")].item_id == started.item_id
    done = events[-1].response
    assert done.status == "completed" and done.usage.output_tokens > 0
    transcript = "".join(
        e.delta for e in events if e.type == "response.output_audio_transcript.delta"
    )
    assert done.output[0].content[0].transcript == transcript
    assert float(done.metadata["vad_end_to_first_audio_ms"]) > 0
    for stage in ("prefill_ms", "first_text_ms", "first_audio_ms"):
        assert stage in done.metadata
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(server.metrics_url)).text
    assert 'omni_turn_stage_seconds_count{stage="vad_end_to_first_audio"} 1.0' in metrics
    assert 'omni_responses_total{status="completed"} 1.0' in metrics
    if isinstance(server.engine, FakeEngine):
        assert "I heard" in transcript


async def test_barge_in_cancels_and_truncate_keeps_what_was_heard(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen2.5-omni") as conn:
        await conn.recv()
        await speak(conn, QUESTION)
        reply = await collect(conn, "response.output_audio.delta")
        while (
            sum(len(e.delta) * 3 // 4 for e in reply if e.type == "response.output_audio.delta")
            < 2 * 24 * 600
        ):
            reply += await collect(
                conn, "response.output_audio.delta"
            )  # 600 ms arrived and is playing
        item_id = reply[-1].item_id
        await speak(conn, "wait a moment please", trailing_ms=0)  # the caller talks over the reply
        events = await collect(conn, "response.done")
        assert first(events, "input_audio_buffer.speech_started") < first(events, "response.done")
        assert events[-1].response.status == "cancelled"
        assert events[-1].response.status_details.reason == "turn_detected"
        # like OpenAI's own clients: truncate at the playback position (here: 600 ms)
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=600)
        truncated = await collect(conn, "conversation.item.truncated")
        assert truncated[-1].audio_end_ms == 600 and "error" not in {e.type for e in truncated}
        await conn.conversation.item.retrieve(item_id=item_id)
        item = (await collect(conn, "conversation.item.retrieved"))[-1].item
        # the caller's turn ends and gets its own reply
        await conn.input_audio_buffer.append(audio=b64(silence(1000)))
        second = await collect(conn, "response.done")
    sent = "".join(
        e.delta for e in reply + events if e.type == "response.output_audio_transcript.delta"
    )
    heard = item.content[0].transcript
    assert heard and sent.startswith(heard) and len(heard) < len(sent)
    assert second[-1].response.status == "completed"
    if isinstance(server.engine, FakeEngine):
        reply_tokens = server.engine.conversation().history[0][1]
        # 600 ms is 30 codec steps: about 30 characters at the fake's step a character (to a
        # word either way), not 30 words
        spoken = 600 // (20 * server.engine.codes_per_char)
        assert "".join(reply_tokens) == heard and abs(len(heard) - spoken) <= 10


async def test_image_then_spoken_question(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen2.5-omni") as conn:
        await conn.recv()
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_image", "image_url": data_url(image_bytes(64, 48))}],
            }
        )
        added = await collect(conn, "conversation.item.done")
        assert added[-1].item.content[0].type == "input_image"
        await speak(conn, "What do you see in this picture?")
        events = await collect(conn, "response.done")
    assert events[-1].response.status == "completed"
    if isinstance(server.engine, FakeEngine):
        transcript = events[-1].response.output[0].content[0].transcript
        assert "I see a 64x48 image" in transcript and "I heard" in transcript


async def test_text_in_text_out(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen2.5-omni") as conn:
        await conn.recv()
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": None}},
            }
        )
        updated = (await collect(conn, "session.updated"))[-1].session
        assert updated.output_modalities == ["text"] and updated.audio.input.turn_detection is None
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Say hello"}],
            }
        )
        await conn.response.create()
        events = await collect(conn, "response.done")
    kinds = {e.type for e in events}
    assert "response.output_text.delta" in kinds
    assert not {"response.output_audio.delta", "response.output_audio_transcript.delta"} & kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output[0].content[0].text == text and text
    if isinstance(server.engine, FakeEngine):
        assert "You said: Say hello" in text


async def test_two_turns_remember_the_first(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen2.5-omni") as conn:
        await conn.recv()
        replies = []
        for text in ("My name is Ada", "What is my name?"):
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                }
            )
            await conn.response.create(response={"instructions": "Answer briefly."})
            replies.append((await collect(conn, "response.done"))[-1].response)
    assert [r.status for r in replies] == ["completed", "completed"]
    if isinstance(server.engine, FakeEngine):
        (conversation,) = server.engine.sessions.values()
        assert (
            len(conversation.history) == 2
            and conversation.replies[-1].instructions == "Answer briefly."
        )
        assert "Earlier you said: My name is Ada" in replies[1].output[0].content[0].transcript


async def test_browser_flow_with_an_ephemeral_key(server: RunningServer) -> None:
    secret = await server.client().realtime.client_secrets.create(
        session={
            "type": "realtime",
            "instructions": "You are a pirate.",
            "audio": {"output": {"voice": "Ethan"}},
        },
        expires_after={"anchor": "created_at", "seconds": 60},
    )
    assert secret.value.startswith("ek_") and secret.session.audio.output.voice == "Ethan"
    async with server.client(api_key=secret.value).realtime.connect(model="qwen2.5-omni") as conn:
        created = await conn.recv()
    assert (
        created.session.instructions == "You are a pirate."
        and created.session.audio.output.voice == "Ethan"
    )
