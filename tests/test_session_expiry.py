"""The session length cap: a `session.expiring` warning before it, then `session_expired` and
a clean close, on the session itself, over WebSocket and over a WebRTC call."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import websockets
from fake_engine import FakeEngine, fake_engine
from realtime_helpers import API_KEY, recv_until, running_server

from omni.bench.calls import CallClient
from omni.metrics import Metrics
from omni.session import Closed, RealtimeSession
from omni.session.session import expiry_warning_lead
from omni.settings import Settings


def test_the_warning_lead_is_the_setting_but_at_most_half_the_session() -> None:
    assert expiry_warning_lead(1800.0, 60.0) == 60.0
    assert expiry_warning_lead(60.0, 60.0) == 30.0
    assert expiry_warning_lead(1800.0, 0.0) == 0.0


async def _events_until_closed(session: RealtimeSession) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        out = await asyncio.wait_for(session.outbox.get(), 10.0)
        if isinstance(out, Closed):
            return [*events, {"type": "closed", "reason": out.reason}]
        if isinstance(out, dict):
            events.append(out)


async def test_session_warns_then_expires_and_closes() -> None:
    engine = FakeEngine()
    settings = Settings(max_session_seconds=1.2, session_expiry_warning_seconds=60.0)
    session = RealtimeSession(engine, settings, Metrics())
    await session.start()
    started = time.monotonic()
    events = await _events_until_closed(session)
    kinds = [e["type"] for e in events]
    assert kinds == ["session.created", "session.expiring", "error", "closed"]
    warning, error = events[1], events[2]["error"]
    assert warning["seconds_left"] == 0.6  # half the session: the setting is longer
    assert warning["expires_at"] == events[0]["session"]["expires_at"]
    assert "max_session_seconds" in warning["message"]
    assert error["code"] == "session_expired" and events[3]["reason"] == "session_expired"
    assert time.monotonic() - started >= 1.2  # never closed before its limit
    assert session.id in engine.closed


async def test_no_warning_when_it_is_turned_off() -> None:
    settings = Settings(max_session_seconds=0.3, session_expiry_warning_seconds=0.0)
    session = RealtimeSession(FakeEngine(), settings, Metrics())
    await session.start()
    kinds = [e["type"] for e in await _events_until_closed(session)]
    assert kinds == ["session.created", "error", "closed"]


async def test_websocket_gets_the_warning_then_a_normal_close() -> None:
    settings: dict[str, Any] = {"max_session_seconds": 1.0, "session_expiry_warning_seconds": 0.4}
    async with running_server(fake_engine, **settings) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        warning = (await recv_until(ws, "session.expiring"))[-1]
        assert warning["seconds_left"] == 0.4
        # the session still works during the last minute
        await ws.send('{"type": "input_audio_buffer.clear"}')
        assert (await recv_until(ws, "input_audio_buffer.cleared"))[0]["type"] == (
            "input_audio_buffer.cleared"
        )
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == "session_expired"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "session_expired")


async def test_openai_sdk_passes_over_the_warning() -> None:
    settings: dict[str, Any] = {"max_session_seconds": 1.0, "session_expiry_warning_seconds": 0.4}
    async with running_server(fake_engine, **settings) as server:
        client = server.client()
        async with client.realtime.connect(model="qwen2.5-omni") as connection:
            kinds = []
            async for event in connection:
                kinds.append(event.type)
                if event.type == "error":
                    break
        assert kinds == ["session.created", "session.expiring", "error"]


async def test_webrtc_call_gets_the_warning_and_is_hung_up() -> None:
    settings: dict[str, Any] = {"max_session_seconds": 1.5, "session_expiry_warning_seconds": 0.5}
    async with running_server(fake_engine, **settings) as server:
        client = CallClient(f"http://127.0.0.1:{server.port}", API_KEY)
        assert (await client.connect()).status_code == 201
        try:
            await client.expect("session.created")
            warning = await client.expect("session.expiring", timeout=5)
            assert warning["seconds_left"] == 0.5
            expired = await client.expect("error", timeout=5)
            assert expired["error"]["code"] == "session_expired"
            deadline = time.monotonic() + 10
            while server.gateway.sessions or client.pc.connectionState != "closed":
                assert time.monotonic() < deadline, "the call was not hung up"
                await asyncio.sleep(0.05)
        finally:
            await client.close()
