"""Speculative replies through the real worker processes on the tiny checkpoint.

Engine: a reply started and then discarded (Engine.discard_reply) leaves the thinker's context
token for token what it would be had the reply never been asked for, with the input sent
during and after it in the same user turn; the next greedy reply (text and codec tokens, so
the talker's context too) is the one of a conversation that never speculated.
WebSocket and WebRTC: a caller who pauses and goes on never gets an event or audio of the
discarded reply.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gateway_fixtures import tiny_engine
from realtime_helpers import (
    RunningServer,
    b64,
    pcm16,
    recv_event,
    running_server,
    send_event,
    words,
)
from test_browser_calls import CHROMIUM, assistant_heard, chromium, enter_key, open_page
from test_browser_calls import hang_up as hang_up_page
from test_browser_calls import place_voice_call
from test_speculation import counter
from test_webrtc_calls import call

from omni.engine.api import AudioChunk, ReplyDone, ReplyOptions, SessionOptions
from omni.engine.engine import EngineConfig, running_engine

RATE = 16_000
SPOKEN = ReplyOptions(greedy=True, max_text_tokens=6, min_text_tokens=6, max_codec_tokens=12)


def spoken(text: str, rate: int = RATE) -> np.ndarray:
    return np.frombuffer(words(text, rate), dtype="<i2").astype(np.float32) / 32768


async def send(engine, session: str, pieces: list[np.ndarray]) -> None:
    for pcm in pieces:
        await engine.append_audio(session, pcm)


async def answer(engine, session: str, options: ReplyOptions, item: str) -> ReplyDone:
    options = ReplyOptions(**{**options.__dict__, "item_id": item})
    async for event in engine.respond(session, options):
        if isinstance(event, ReplyDone):
            return event
    raise AssertionError("respond() ended without ReplyDone")


def test_a_discarded_reply_leaves_the_context_as_if_never_asked(tiny_checkpoint: Path) -> None:
    before = [c for c in np.array_split(spoken("I was thinking that"), 5)]
    during = [np.zeros(3200, np.float32)]  # the pause's silence, sent while the reply ran
    after = list(np.array_split(spoken("we could go tomorrow"), 4))

    async def run() -> None:
        async with running_engine(EngineConfig(str(tiny_checkpoint))) as engine:
            await engine.open_session("s", SessionOptions())
            await send(engine, "s", before)
            await engine.label_input("s", "u1")
            # the speculative reply: some audio out, then cancelled as a resume would
            events = engine.respond("s", ReplyOptions(**{**SPOKEN.__dict__, "item_id": "a1"}))
            async for event in events:
                if isinstance(event, AudioChunk):
                    await engine.cancel("s")
                if isinstance(event, ReplyDone):
                    assert event.status in ("cancelled", "completed")
                    assert event.text_tokens > 0
            await send(engine, "s", during)
            await engine.discard_reply("s", "a1")
            await send(engine, "s", after)
            speculated = await engine.context_digest("s")
            await engine.label_input("s", "u1")
            reply = await answer(engine, "s", SPOKEN, "a2")

            await engine.open_session("f", SessionOptions())
            await send(engine, "f", before + during + after)
            assert await engine.context_digest("f") == speculated
            await engine.label_input("f", "u1")
            fresh = await answer(engine, "f", SPOKEN, "a2")
            assert reply.status == fresh.status == "completed"
            assert reply.text_token_ids == fresh.text_token_ids
            assert reply.codec_tokens == fresh.codec_tokens  # the talker's context too

            # a digest tells different contexts apart (audio placeholders are one token id:
            # the reply above is what shows the audio itself came back the same)
            await engine.open_session("g", SessionOptions())
            await send(engine, "g", before + during)
            assert await engine.context_digest("g") != speculated

    asyncio.run(run())


async def test_over_websocket_a_discarded_reply_is_never_heard() -> None:
    first, second = spoken("I was thinking that", 24_000), spoken("we could go tomorrow", 24_000)
    quiet = np.zeros(24_000, np.float32)
    async with running_server(tiny_engine) as server, server.ws() as ws:
        assert (await recv_event(ws))["type"] == "session.created"
        await send_event(
            ws, {"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 4}}
        )

        async def say(audio: np.ndarray) -> None:
            data = pcm16(audio)
            for i in range(0, len(data), 4800):  # 100 ms appends, in real time
                await send_event(
                    ws, {"type": "input_audio_buffer.append", "audio": b64(data[i : i + 4800])}
                )
                await asyncio.sleep(0.1)

        await say(quiet[:7200])
        await say(first)
        await say(quiet[:9600])  # 400 ms: a pause, not the end of the turn
        await say(second)
        await say(quiet)
        events, raw = [], []
        while not events or events[-1]["type"] != "response.done":
            message = await asyncio.wait_for(ws.recv(), 120)
            raw.append(message)
            events.append(json.loads(message))
        misses = counter(server.gateway.metrics, "omni_speculations_total", outcome="miss")
    kinds = [e["type"] for e in events]
    assert kinds.count("response.created") == 1
    done = events[-1]["response"]
    assert done["status"] == "completed", done
    # every event that names a response or an item names this one or the caller's item
    user_items = {e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"}
    assert len(user_items) == 1
    reply_item = done["output"][0]["id"]
    for e in events:
        assert e.get("response_id", done["id"]) == done["id"], e
        item = e.get("item_id") or (e.get("item") or {}).get("id")
        assert item in (None, reply_item, *user_items), e
    assert misses >= 1  # the pause did start one
    assert done["metadata"]["speculation"] in ("hit", "miss")


async def test_over_webrtc_a_discarded_reply_that_made_audio_is_never_played() -> None:
    """A long silence window, so the reply started at the pause has time to make audio (held)
    before the caller goes on: none of it may reach the caller's track, before or after."""
    first, second = words("I was thinking that"), words("we could go tomorrow")
    # 2 s: a pause within a 3 s silence window, time enough for audio even on a loaded CPU
    pause = np.zeros(48_000, np.int16)
    speech = np.concatenate([np.frombuffer(first, np.int16), pause, np.frombuffer(second, np.int16)])
    async with running_server(tiny_engine) as server, call(server) as client:
        await client.expect("session.created")
        detection = {"type": "server_vad", "silence_duration_ms": 3000}
        client.send(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "max_output_tokens": 4,
                    "audio": {"input": {"turn_detection": detection}},
                },
            }
        )
        await client.expect("session.updated")
        ended = await client.say(speech)
        done = (await client.expect("response.done"))["response"]
        await client.seen("output_audio_buffer.stopped", response_id=done["id"])
        discarded = _discarded_codec_frames(server)
        loud = list(client.loud)
        kinds = [e["type"] for e in client.events]
        assert await client.hang_up() == 204
    assert done["status"] == "completed", done
    assert kinds.count("response.created") == 1
    assert discarded > 0  # the discarded reply made audio
    # the only reply starts after the caller's last word and its silence window: any sound
    # before the caller finished speaking was the discarded one's
    assert loud and all(t > ended for t in loud)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
async def test_in_chromium_a_discarded_reply_is_never_played(tmp_path: Path) -> None:
    """The page's call, the caller's microphone a file: a phrase, a 2 s pause, a phrase, then
    silence, with a 3 s silence window (the server's setting). Until the page is told the
    caller stopped, the reply track must stay silent, though the pause started a reply."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed (apt-get install espeak-ng sox)")
    first, second, mic = tmp_path / "first.wav", tmp_path / "second.wav", tmp_path / "mic.wav"
    subprocess.run(["espeak-ng", "-w", str(first), "I was thinking that"], check=True)
    subprocess.run(["espeak-ng", "-w", str(second), "we could go tomorrow"], check=True)
    subprocess.run(["sox", str(first), str(tmp_path / "paused.wav"), "pad", "0.3", "2"], check=True)
    subprocess.run(
        ["sox", str(tmp_path / "paused.wav"), str(second), "-r", "48000", "-c", "1", "-b", "16",
         str(mic), "pad", "0", "20"],
        check=True,
    )
    async with running_server(tiny_engine, vad_silence_duration_ms=3000) as server:
        async with chromium(mic) as browser:
            page = await open_page(browser, server)
            await enter_key(page)
            await place_voice_call(page, server)
            deadline = asyncio.get_running_loop().time() + 60
            while True:  # read together, so sound and the stop are seen in one instant
                stopped, peak = await page.evaluate(
                    "[omni.stats.events.includes('input_audio_buffer.speech_stopped'),"
                    " omni.stats.remotePeak]"
                )
                if stopped:
                    break
                assert peak <= 0.05, "the reply track played before the caller's turn ended"
                assert asyncio.get_running_loop().time() < deadline, "the turn never ended"
                await asyncio.sleep(0.05)
            await assistant_heard(page)
            await hang_up_page(page, server)
        discarded = _discarded_codec_frames(server)
    assert discarded > 0  # the discarded reply made audio


def _discarded_codec_frames(server: RunningServer) -> float:
    metrics = server.gateway.metrics
    return counter(metrics, "omni_speculation_discarded_total", unit="codec_frames")
