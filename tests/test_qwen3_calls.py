"""Qwen3-Omni on every transport, through the real worker processes on the tiny Qwen3
checkpoint: the official openai SDK over WebSocket (a spoken turn, barge-in with truncation, a
an image and a typed question), an aiortc WebRTC video call (camera frames with the speech,
then barge-in), and a video call from the page in real Chromium. The tiny model speaks noise, so replies are checked for shape and
sound, not words; what they are token for token is tests/test_qwen3_engine.py's part.
One server (one engine start) serves the whole module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from realtime_helpers import RunningServer, b64, data_url, image_bytes, running_server
from test_browser_calls import CHROMIUM, speech_wav  # noqa: F401 (a fixture)
from test_realtime_sdk import QUESTION, collect, first, speak
from test_webrtc_calls import CameraTrack, call, utterance
from test_webrtc_tiny_engine import responses_done, voice_call_from_the_page

from omni.checkpoints.family import QWEN3_OMNI
from omni.engine.engine import OmniEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")


def tiny_qwen3_engine():
    from omni.checkpoints.tiny import ensure_tiny_checkpoint
    from omni.engine.engine import EngineConfig, running_engine

    path = ensure_tiny_checkpoint(variant="tiny-qwen3-omni")
    return running_engine(EngineConfig(model_path=str(path), max_codec_tokens=64))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[RunningServer]:
    async with running_server(tiny_qwen3_engine, voices=QWEN3_OMNI.voices) as running:
        assert isinstance(running.engine, OmniEngine) and running.engine.family is QWEN3_OMNI
        yield running


async def test_sdk_spoken_turn_barge_in_and_truncation(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen3-omni") as conn:
        created = await conn.recv()
        assert created.session.audio.output.voice == "Ethan"  # the family's first voice
        await speak(conn, QUESTION)
        reply = await collect(conn, "response.output_audio.delta")
        while sum(len(e.delta) * 3 // 4 for e in reply if e.type == "response.output_audio.delta") < 2 * 24 * 400:
            reply += await collect(conn, "response.output_audio.delta")  # 400 ms arrived
        item_id = reply[-1].item_id
        await speak(conn, "wait a moment please", trailing_ms=0)  # the caller talks over it
        events = await collect(conn, "response.done")
        assert first(events, "input_audio_buffer.speech_started") < first(events, "response.done")
        assert events[-1].response.status == "cancelled"
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=400)
        truncated = await collect(conn, "conversation.item.truncated")
        assert truncated[-1].audio_end_ms == 400 and "error" not in {e.type for e in truncated}
        await conn.input_audio_buffer.append(audio=b64(bytes(2 * 24000)))  # 1 s of silence
        second = await collect(conn, "response.done")
    assert second[-1].response.status == "completed"
    assert any(e.type == "response.output_audio.delta" for e in second)


async def test_sdk_an_image_and_a_typed_question(server: RunningServer) -> None:
    async with server.client().realtime.connect(model="qwen3-omni") as conn:
        await conn.recv()
        await conn.session.update(
            session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 16}
        )
        content = [
            {"type": "input_image", "image_url": data_url(image_bytes(256, 192))},
            {"type": "input_text", "text": "What is in this picture?"},
        ]
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": content})
        await conn.response.create()
        events = await collect(conn, "response.done")
    assert "error" not in {e.type for e in events}
    done = events[-1].response
    assert done.status == "completed" and done.output[0].content[0].text
    # the image's 48 tokens (16 x 12 patches of 16 px, merged 2 x 2) were in the prompt
    assert done.usage.input_tokens > 48


async def test_webrtc_video_call_spoken_turn_then_barge_in(server: RunningServer) -> None:
    async with call(server, video=CameraTrack()) as client:
        await client.expect("session.created")
        await asyncio.sleep(1.0)  # the camera is on before the caller speaks, as in a call
        ended = await client.say(utterance())
        first_reply = (await client.expect("response.created"))["response"]
        await client.first_sound_after(ended)
        barge = asyncio.create_task(client.say(utterance("Wait, stop.")))
        cleared = await client.expect("output_audio_buffer.cleared")
        assert cleared["response_id"] == first_reply["id"]
        assert (await client.expect("conversation.item.truncated"))["audio_end_ms"] > 0
        await barge
        first_done, second_done = await responses_done(client, 2)
        assert first_done["id"] == first_reply["id"] and second_done["status"] == "completed"
        # the turn was a video: its camera frames' tokens (112 a grid step at 448 x 252) are
        # in its prompt, far more than its ~2 s of speech alone (26 tokens a second)
        assert first_done["usage"]["input_tokens"] > 150
        assert await client.hang_up() == 204
    assert server.gateway.sessions == set()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
async def test_a_video_call_from_the_page(
    server: RunningServer,
    speech_wav: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    await voice_call_from_the_page(server, speech_wav, button="#video-call")
