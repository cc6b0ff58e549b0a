"""What the caller said, as text, end to end: the real model workers and the real transcriber
worker on the tiny checkpoints, over WebSocket and over a WebRTC data channel (aiortc).

A committed user audio item gets `conversation.item.input_audio_transcription.delta` events
and one `.completed` with the same item id, the transcript lands in the item, and the reply
never waits for it (the transcriber is held until the reply is done). Without `transcription`
nothing is transcribed. The tiny Whisper's words are random, so text is checked for shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import websockets
from fake_engine import fake_engine
from gateway_fixtures import tiny_engine
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
)
from realtime_helpers import (
    TIMEOUT,
    RunningServer,
    b64,
    chunks,
    recv_until,
    running_server,
    send_event,
    speech,
)
import test_browser_calls as browser
from test_browser_calls import speech_wav  # noqa: F401 (a fixture)
from test_webrtc_calls import call, utterance

from omni.checkpoints.whisper import resolve_transcriber
from omni.engine.engine import OmniEngine
from omni.engine.transcriber import Transcriber, TranscriberOptions

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRANSCRIPTION = "conversation.item.input_audio_transcription"
SETTINGS = {"model": "whisper-1", "language": "en", "prompt": "Ada Lovelace"}


def tiny_transcriber() -> AbstractAsyncContextManager[Transcriber]:
    resolved = resolve_transcriber("auto", main_is_tiny=True)
    assert resolved is not None
    return Transcriber(TranscriberOptions(str(resolved.path)))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[RunningServer]:
    async with running_server(tiny_engine, tiny_transcriber) as running:
        assert isinstance(running.engine, OmniEngine)  # the worker processes, not a script
        yield running


def transcriber_of(server: RunningServer) -> Transcriber:
    assert server.gateway.transcriber is not None
    return server.gateway.transcriber


async def recv_until_all(
    ws: websockets.ClientConnection, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Events until `done(events)` holds."""
    events: list[dict[str, Any]] = []

    async def collect() -> list[dict[str, Any]]:
        while not done(events):
            events.append(json.loads(await ws.recv()))
        return events

    return await asyncio.wait_for(collect(), TIMEOUT)


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def text_session(ws: websockets.ClientConnection, **audio_input: Any) -> dict[str, Any]:
    """Manual turns, short text replies; returns the updated session."""
    await recv_until(ws, "session.created")
    session = {
        "type": "realtime",
        "output_modalities": ["text"],
        "max_output_tokens": 4,
        "audio": {"input": {"turn_detection": None, **audio_input}},
    }
    await send_event(ws, {"type": "session.update", "session": session})
    return (await recv_until(ws, "session.updated"))[-1]["session"]


async def say_and_commit(ws: websockets.ClientConnection) -> str:
    """A spoken turn, committed and answered; returns the committed item's id."""
    for piece in chunks(speech("Hello there, how are you?")):
        await send_event(ws, {"type": "input_audio_buffer.append", "audio": b64(piece)})
    await send_event(ws, {"type": "input_audio_buffer.commit"})
    await send_event(ws, {"type": "response.create"})
    committed = (await recv_until(ws, "input_audio_buffer.committed"))[-1]
    return committed["item_id"]


async def test_a_committed_turn_is_transcribed_into_its_item(server: RunningServer) -> None:
    async with server.ws() as ws:
        session = await text_session(ws, transcription=SETTINGS)
        assert session["audio"]["input"]["transcription"] == SETTINGS
        item_id = await say_and_commit(ws)
        events = await recv_until_all(
            ws,
            lambda es: bool(
                of_type(es, f"{TRANSCRIPTION}.completed") and of_type(es, "response.done")
            ),
        )
        deltas = of_type(events, f"{TRANSCRIPTION}.delta")
        (completed,) = of_type(events, f"{TRANSCRIPTION}.completed")
        assert deltas and all(d["item_id"] == item_id and d["content_index"] == 0 for d in deltas)
        assert completed["item_id"] == item_id and completed["content_index"] == 0
        assert completed["transcript"] == "".join(d["delta"] for d in deltas) != ""
        assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 1
        for delta in deltas:  # the shapes the official SDK parses
            ConversationItemInputAudioTranscriptionDeltaEvent.model_validate(delta)
        ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(completed)
        assert of_type(events, "response.done")[0]["response"]["status"] == "completed"

        await send_event(ws, {"type": "conversation.item.retrieve", "item_id": item_id})
        item = (await recv_until(ws, "conversation.item.retrieved"))[-1]["item"]
        assert item["content"] == [{"type": "input_audio", "transcript": completed["transcript"]}]


async def test_the_reply_does_not_wait_for_the_transcript(server: RunningServer) -> None:
    transcriber = transcriber_of(server)
    async with server.ws() as ws:
        await text_session(ws, transcription=SETTINGS)
        transcriber.hold()  # the item stays queued: no transcript can come before release
        try:
            item_id = await say_and_commit(ws)
            before = await recv_until(ws, "response.done")
            assert before[-1]["response"]["status"] == "completed"
            assert not any(e["type"].startswith(TRANSCRIPTION) for e in before)
            assert transcriber.pending == 1
        finally:
            transcriber.release()
        after = await recv_until(ws, f"{TRANSCRIPTION}.completed")
        assert after[-1]["item_id"] == item_id and of_type(after, f"{TRANSCRIPTION}.delta")


async def test_without_transcription_nothing_is_transcribed(server: RunningServer) -> None:
    transcriber = transcriber_of(server)
    async with server.ws() as ws:
        session = await text_session(ws)
        assert session["audio"]["input"]["transcription"] is None
        transcriber.hold()  # anything asked for would wait here, countable
        try:
            item_id = await say_and_commit(ws)
            await send_event(ws, {"type": "conversation.item.retrieve", "item_id": item_id})
            events = await recv_until_all(
                ws,
                lambda es: bool(
                    of_type(es, "response.done") and of_type(es, "conversation.item.retrieved")
                ),
            )
            assert transcriber.pending == 0
        finally:
            transcriber.release()
        assert not any(e["type"].startswith(TRANSCRIPTION) for e in events)
        (retrieved,) = of_type(events, "conversation.item.retrieved")
        assert retrieved["item"]["content"][0]["transcript"] is None


async def test_a_server_without_a_transcriber_says_so_for_each_item() -> None:
    async with running_server(fake_engine) as server, server.ws() as ws:
        await text_session(ws, transcription=SETTINGS)
        item_id = await say_and_commit(ws)
        failed = (await recv_until(ws, f"{TRANSCRIPTION}.failed"))[-1]
        ConversationItemInputAudioTranscriptionFailedEvent.model_validate(failed)
        assert failed["item_id"] == item_id and failed["content_index"] == 0
        assert failed["error"]["code"] == "transcription_off"
        assert "transcriber_model" in failed["error"]["message"]


async def test_an_unknown_language_is_refused_naming_the_field(server: RunningServer) -> None:
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        bad = {"type": "realtime", "audio": {"input": {"transcription": {"language": "xx"}}}}
        await send_event(ws, {"type": "session.update", "session": bad})
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["param"] == "session.audio.input.transcription.language"
        # the beta shape's field works the same
        beta = {"input_audio_transcription": {"model": "whisper-1"}}
        await send_event(ws, {"type": "session.update", "session": beta})
        updated = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert updated["input_audio_transcription"]["model"] == "whisper-1"


async def test_a_webrtc_call_gets_the_transcript_on_its_data_channel(
    server: RunningServer,
) -> None:
    async with call(server) as client:
        await client.expect("session.created")
        session = {
            "type": "realtime",
            "output_modalities": ["text"],
            "max_output_tokens": 4,
            "audio": {"input": {"transcription": SETTINGS}},
        }
        client.send({"type": "session.update", "session": session})
        await client.expect("session.updated")
        await client.say(utterance())
        started = await client.expect("input_audio_buffer.speech_started")
        completed = await client.expect(f"{TRANSCRIPTION}.completed")
        assert completed["item_id"] == started["item_id"]
        deltas = [
            e["delta"]
            for e in client.events
            if e["type"] == f"{TRANSCRIPTION}.delta" and e["item_id"] == started["item_id"]
        ]
        assert deltas and completed["transcript"] == "".join(deltas)
        # before or after the transcript: the two do not wait for each other
        assert (await client.seen("response.done"))["response"]["status"] == "completed"
        assert await client.hang_up() == 204


# the caller's line on the page: what it says once the transcript came
CALLER_WORDS = """() => [...document.querySelectorAll('#transcript li.you .text')]
    .map((e) => e.textContent)
    .find((t) => t && t !== 'speaking…' && !t.startsWith('spoke for'))"""


@pytest.mark.skipif(
    not Path(browser.CHROMIUM).exists(), reason="Debian's chromium is not installed"
)
async def test_the_page_shows_the_callers_words(
    server: RunningServer,
    speech_wav: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    async with browser.chromium(speech_wav) as chromium:
        page = await browser.open_page(chromium, server)
        await browser.enter_key(page)
        await browser.place_voice_call(page, server)
        completed = f"omni.stats.events.includes('{TRANSCRIPTION}.completed')"
        await page.wait_for_function(completed, timeout=browser.WAIT_MS)
        words = await page.evaluate(CALLER_WORDS)
        (session,) = server.gateway.sessions
        assert session.config.transcription is not None  # the page asked for it
        # the words are the transcript the server wrote into the caller's first item
        first = next(i for i in session.conversation._items.values() if i.role == "user")
        assert words and words == first.content[0]["transcript"]
        await browser.hang_up(page, server)
        assert await page.locator("#alert").is_hidden()
