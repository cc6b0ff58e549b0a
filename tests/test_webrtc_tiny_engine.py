"""WebRTC calls end to end through the real worker processes on the tiny checkpoint: an
aiortc caller's spoken turn and barge-in (the truncation runs in the real thinker and
talker), a call with a data channel and no media at all, and a call from the page in real
Chromium. The tiny model speaks noise, so replies are checked for shape and sound, not words.
One server (one engine start) serves the whole module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from gateway_fixtures import tiny_engine
from realtime_helpers import API_KEY, RunningServer, running_server
from test_browser_calls import (
    CHROMIUM,
    WAIT_MS,
    assistant_heard,
    chromium,
    enter_key,
    hang_up,
    open_page,
    place_voice_call,
    speech_wav,  # noqa: F401 (a fixture)
)
from test_webrtc_calls import base_url, call, utterance

from omni.bench.calls import TIMEOUT, CallClient
from omni.engine.engine import OmniEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[RunningServer]:
    async with running_server(tiny_engine) as running:
        assert isinstance(running.engine, OmniEngine)  # the worker processes, not a script
        yield running


async def responses_done(client: CallClient, count: int) -> list[dict[str, Any]]:
    """The first `count` finished responses, in order, once there are that many."""

    async def find() -> list[dict[str, Any]]:
        while True:
            done = [e["response"] for e in client.events if e["type"] == "response.done"]
            if len(done) >= count:
                return done[:count]
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(find(), TIMEOUT)


async def test_spoken_turn_then_barge_in(server: RunningServer) -> None:
    async with call(server) as client:
        await client.expect("session.created")
        ended = await client.say(utterance())
        await client.expect("input_audio_buffer.speech_stopped")
        first = (await client.expect("response.created"))["response"]
        heard = await client.first_sound_after(ended)

        # speak over the reply while it plays: it stops, and is cut to what was played
        barge = asyncio.create_task(client.say(utterance("Wait, stop.")))
        await client.expect("input_audio_buffer.speech_started")
        cleared = await client.expect("output_audio_buffer.cleared")
        cleared_at = time.monotonic()
        assert cleared["response_id"] == first["id"]
        truncated = await client.expect("conversation.item.truncated")
        # the caller cannot have heard more sound than the server says it played
        sound_ms = 20 * sum(1 for t in client.loud if heard <= t <= cleared_at + 0.3)
        assert 0 < truncated["audio_end_ms"] and sound_ms <= truncated["audio_end_ms"] + 100
        await barge

        # the interruption is a turn of its own, answered by the engine that was cut short
        first_done, second_done = await responses_done(client, 2)
        assert first_done["id"] == first["id"]
        assert first_done["status"] in ("cancelled", "completed")  # still making it, or done
        assert second_done["status"] == "completed"
        await client.seen("output_audio_buffer.stopped", response_id=second_done["id"])
        assert await client.hang_up() == 204
    assert server.gateway.sessions == set()


async def test_a_barge_in_keeps_the_share_of_the_words_that_was_played(
    server: RunningServer,
) -> None:
    """Cut about 30 % into a reply's audio, the model keeps about 30 % of its text: what that
    audio spoke, not one token per 20 ms codec step (that would keep it all)."""
    engine = server.engine
    assert isinstance(engine, OmniEngine)
    async with call(server) as client:
        await client.expect("session.created")
        client.send({"type": "session.update", "session": {"max_output_tokens": 12, "seed": 7}})
        await client.expect("session.updated")
        ended = await client.say(utterance())
        await client.expect("response.created")
        await client.first_sound_after(ended)
        # the reply is 250 codes (5 s): barge in about 30 % of the way (the server hears the
        # interruption a little after it starts; exactly where does not matter)
        await asyncio.sleep(1.5)
        barge = asyncio.create_task(client.say(utterance("Wait, stop.")))
        truncated = await client.expect("conversation.item.truncated")
        # read at once: the interruption's own reply replaces both when it ends
        (session,) = engine._sessions.values()
        spoken, turn = session.last_spoken, session.replay._last_reply()
        assert spoken is not None and turn is not None
        cut_ms, tokens = truncated["audio_end_ms"], spoken.text_tokens
        assert tokens >= 8 and spoken.codes >= 12 * tokens  # all its text was in the speech
        assert cut_ms // 20 >= tokens  # so 20 ms a token would have kept every one
        share = cut_ms / (20 * spoken.codes)
        # the same share of its text (the rule shares it out by characters)
        chars = dict(spoken.delta_ends)[len(turn.tokens)] if turn.tokens else 0
        assert share <= 0.6 and abs(chars / spoken.delta_ends[-1][1] - share) <= 0.1
        await barge
        first_done, _ = await responses_done(client, 2)
        assert first_done["usage"]["output_token_details"]["text_tokens"] == tokens
        assert await client.hang_up() == 204


async def test_a_call_with_only_a_data_channel_talks_in_text(server: RunningServer) -> None:
    client = CallClient(base_url(server), API_KEY, microphone=False)
    try:
        placed = await client.connect()
        assert placed.status_code == 201, placed.text
        offer = client.pc.localDescription.sdp
        assert "m=application" in offer and "m=audio" not in offer and "m=video" not in offer
        await client.expect("session.created")
        client.send({"type": "session.update", "session": {"output_modalities": ["text"]}})
        await client.expect("session.updated")
        client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hello, who are you?"}],
                },
            }
        )
        client.send({"type": "response.create"})
        done = (await client.expect("response.done"))["response"]
        assert done["status"] == "completed"
        deltas = [e["delta"] for e in client.events if e["type"] == "response.output_text.delta"]
        (content,) = done["output"][0]["content"]
        assert content["type"] == "output_text" and content["text"] == "".join(deltas)
        assert not any("audio" in e["type"] for e in client.events)
        assert await client.hang_up() == 204
    finally:
        await client.close()
    assert server.gateway.sessions == set()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
async def test_a_voice_call_from_the_page(
    server: RunningServer,
    speech_wav: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    await voice_call_from_the_page(server, speech_wav)


async def voice_call_from_the_page(
    server: RunningServer, speech_wav: Path, button: str = "#voice-call"
) -> None:
    """Chromium places a call from the page (`button`: a voice or a video call), says
    `speech_wav` and hears a reply."""
    async with chromium(speech_wav) as browser:
        page = await open_page(browser, server)
        await enter_key(page)
        await place_voice_call(page, server, button)
        # the model's reply is written and heard: noise, but sound that plays
        await page.wait_for_selector("#transcript li.assistant", timeout=WAIT_MS)
        await assistant_heard(page)
        await hang_up(page, server)
        assert await page.locator("#alert").is_hidden()

