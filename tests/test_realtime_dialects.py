"""Clients in other shapes: the OpenAI beta protocol, Qwen-Omni-Realtime's dialect (beta
names, 16 kHz "pcm16" in, "pcm24" out, camera frames by input_image_buffer.append), and
G.711 telephony audio."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import websockets
from fake_engine import FakeEngine
from realtime_helpers import (
    API_KEY,
    b64,
    chunks,
    image_bytes,
    recv_event,
    recv_until,
    send_event,
    silence,
    speech,
)

from omni.engine.resample import alaw_encode, ulaw_encode

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory
QUESTION = "What is the capital of France?"


async def test_openai_beta_header_gets_beta_events(server: Any) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "OpenAI-Beta": "realtime=v1"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        session = (await recv_event(ws))["session"]
        assert (
            session["modalities"] == ["text", "audio"] and session["input_audio_format"] == "pcm16"
        )
        assert "audio" not in session and "type" not in session
        await send_event(
            ws,
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                },
            },
        )
        created = await recv_event(ws)
        assert created["type"] == "conversation.item.created"
        await send_event(ws, {"type": "response.create", "response": {"modalities": ["text"]}})
        events = await recv_until(ws, "response.done")
    kinds = {e["type"] for e in events}
    assert "response.text.delta" in kinds and "response.text.done" in kinds
    assert not any(
        kind.startswith(("response.output_text", "response.output_audio")) for kind in kinds
    )
    done = events[-1]["response"]
    assert done["modalities"] == ["text"] and done["output"][0]["content"][0]["type"] == "text"


async def test_qwen_omni_realtime_client(server: Any) -> None:
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(
            ws,
            {
                "type": "session.update",
                "session": {
                    "modalities": ["text", "audio"],
                    "voice": "Ethan",
                    "input_audio_format": "pcm16",
                    "output_audio_format": "pcm24",
                    "instructions": "You are helpful.",
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.5,
                        "silence_duration_ms": 800,
                    },
                    "seed": 1314,
                    "max_tokens": 512,
                    "top_k": 50,
                },
            },
        )
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert (session["input_audio_format"], session["output_audio_format"]) == ("pcm16", "pcm24")
        assert (
            session["turn_detection"]["silence_duration_ms"] == 800 and session["voice"] == "Ethan"
        )
        words = speech("What is on the table?", 16000)
        audio = silence(300, 16000) + words + silence(1200, 16000)
        for index, chunk in enumerate(chunks(audio, 16000)):
            await send_event(ws, {"type": "input_audio_buffer.append", "audio": b64(chunk)})
            if index % 6 == 5:  # about one frame a second while talking
                await send_event(
                    ws, {"type": "input_image_buffer.append", "image": b64(image_bytes())}
                )
        events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert "error" not in kinds
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    assert "response.audio.delta" in kinds and "response.audio_transcript.delta" in kinds
    delta = next(e for e in events if e["type"] == "response.audio.delta")
    assert len(base64.b64decode(delta["delta"])) % 2 == 0
    if isinstance(server.engine, FakeEngine):
        conversation = server.engine.conversation()
        turn = conversation.history[0][0]
        # 16 kHz in, taken as 16 kHz: the turn holds the words (a speculative reply's turn
        # ends at the pause before the stop, without the rest of the silence)
        assert 0.9 * len(words) / 32000 < turn.audio_samples / 16000 < len(audio) / 32000 + 0.1
        assert turn.frames >= 1
        options = conversation.replies[0]
        assert (options.voice, options.seed, options.max_text_tokens) == ("Ethan", 1314, 512)


@pytest.mark.parametrize("law", ["pcmu", "pcma"])
async def test_g711_telephony_audio(server: Any, law: str) -> None:
    encode = ulaw_encode if law == "pcmu" else alaw_encode
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(
            ws,
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": f"audio/{law}"}}},
                },
            },
        )
        session = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert session["audio"]["input"]["format"] == {"type": f"audio/{law}"}
        pcm = np.frombuffer(
            silence(300, 8000) + speech(QUESTION, 8000) + silence(1200, 8000), "<i2"
        )
        for start in range(0, len(pcm), 800):  # 100 ms of 8 kHz G.711: 800 bytes
            await send_event(
                ws,
                {
                    "type": "input_audio_buffer.append",
                    "audio": b64(encode(pcm[start : start + 800])),
                },
            )
        events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert "error" not in kinds and kinds.count("input_audio_buffer.speech_started") == 1
    assert events[-1]["response"]["status"] == "completed"
