"""A worker crash mid-reply, seen by a WebSocket client: an `error` event (engine_error), the
reply ends failed, and the next turn works. Real engine on the tiny checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from realtime_helpers import recv_until, running_server, send_event

from omni.checkpoints.tiny import ensure_tiny_checkpoint
from omni.engine.api import Engine
from omni.engine.engine import EngineConfig, OmniEngine, running_engine

REPLY = {"type": "response.create", "response": {"max_output_tokens": 30}}


@asynccontextmanager
async def faulty_engine() -> AsyncIterator[Engine]:
    """The real engine, with fault injection on."""
    config = EngineConfig(str(ensure_tiny_checkpoint()), max_codec_tokens=60, allow_faults=True)
    async with running_engine(config) as engine:
        yield engine


def user_text(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    }


async def test_a_crash_mid_reply_is_an_error_event_and_the_call_goes_on() -> None:
    async with running_server(faulty_engine) as server, server.ws() as ws:
        engine = server.engine
        assert isinstance(engine, OmniEngine)
        await recv_until(ws, "session.created")
        await send_event(ws, user_text("Hello?"))
        await recv_until(ws, "conversation.item.done")
        engine.inject_fault("thinker", "crash", after_steps=3)
        await send_event(ws, REPLY)
        events = await recv_until(ws, "response.done")
        kinds = [event["type"] for event in events]
        errors = [event["error"] for event in events if event["type"] == "error"]
        assert len(errors) == 1, kinds
        assert errors[0]["code"] == "engine_error" and errors[0]["type"] == "server_error"
        assert "the thinker worker died" in errors[0]["message"]
        assert kinds.index("error") < kinds.index("response.done")  # told first
        done = events[-1]["response"]
        assert done["status"] == "failed"
        assert "the thinker worker died" in done["status_details"]["error"]["message"]

        while not engine.ready:  # the workers restart; the conversation is rebuilt
            await asyncio.sleep(0.1)
        await send_event(ws, user_text("Are you back?"))
        await send_event(ws, REPLY)
        events = await recv_until(ws, "response.done")
        assert "error" not in [event["type"] for event in events]
        assert events[-1]["response"]["status"] == "completed"
