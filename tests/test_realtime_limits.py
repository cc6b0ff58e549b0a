"""Auth, caps, readiness and binding: refusals come before any model work and say why."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from fake_engine import FakeEngine
from realtime_helpers import (
    API_KEY,
    b64,
    recv_event,
    recv_until,
    running_server,
    send_event,
    silence,
)

from omni.engine.api import EngineError
from omni.gateway.app import create_app
from omni.gateway.auth import Denied, Grant, KeyStore
from omni.gateway.serve import bind_host, server_config
from omni.settings import Settings

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory


def model_calls(server: Any) -> list[tuple[str, str]]:
    engine = server.engine
    return engine.calls if isinstance(engine, FakeEngine) else []


# -- auth


@pytest.mark.parametrize("key", [None, "wrong-key", "ek_not_a_real_secret"])
async def test_missing_or_wrong_key_is_refused_before_any_model_work(
    server: Any, key: str | None
) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with server.ws(api_key=key):
            pass
    assert refused.value.response.status_code == 401
    assert b"invalid_api_key" in refused.value.response.body
    assert model_calls(server) == []


async def test_browser_subprotocol_key_is_accepted(server: Any) -> None:
    protocols = ["realtime", f"openai-insecure-api-key.{API_KEY}"]
    async with websockets.connect(server.ws_url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "realtime"
        assert (await recv_event(ws))["type"] == "session.created"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            server.ws_url, subprotocols=["realtime", "openai-insecure-api-key.nope"]
        ):
            pass


async def test_client_secrets_need_a_real_key(server: Any) -> None:
    url = f"http://127.0.0.1:{server.port}/v1/realtime/client_secrets"
    async with httpx.AsyncClient() as http:
        assert (await http.post(url, json={})).status_code == 401
        minted = await http.post(url, json={}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert minted.status_code == 200
        secret = minted.json()["value"]
        # a client secret opens sessions but cannot mint more
        again = await http.post(url, json={}, headers={"Authorization": f"Bearer {secret}"})
        assert again.status_code == 401
        bad = await http.post(
            url,
            json={"session": {"type": "realtime", "audio": {"output": {"voice": "x"}}}},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert (
            bad.status_code == 400 and bad.json()["error"]["param"] == "session.audio.output.voice"
        )
    async with server.ws(api_key=secret) as ws:
        assert (await recv_event(ws))["type"] == "session.created"


def test_client_secrets_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyStore(["real"], None)
    real = keys.check("real")
    assert isinstance(real, Grant)
    secret = keys.mint(real, 10, 1, None)
    assert isinstance(keys.check(secret.value), Grant)
    now = secret.expires_at + 1
    monkeypatch.setattr("omni.gateway.auth.time.time", lambda: now)
    assert keys.check(secret.value) == Denied("the client secret has expired")


async def test_no_keys_configured_means_no_auth(start_server: Any) -> None:
    async with start_server(api_keys=[]) as server, server.ws(api_key=None) as ws:
        assert (await recv_event(ws))["type"] == "session.created"


def test_without_keys_the_server_binds_loopback_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert bind_host(Settings(host="0.0.0.0", api_keys=[])) == "127.0.0.1"
    assert "no API keys" in caplog.text and "0.0.0.0" in caplog.text
    assert bind_host(Settings(host="0.0.0.0", api_keys=["k"])) == "0.0.0.0"


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_API_KEYS", "alpha, beta")
    monkeypatch.setenv("OMNI_MAX_SESSIONS", "3")
    settings = Settings()
    assert settings.api_keys == ["alpha", "beta"] and settings.max_sessions == 3


# -- caps


async def test_connection_over_the_session_cap_is_refused(start_server: Any) -> None:
    async with start_server(max_sessions=1) as server:
        async with server.ws() as first:
            await recv_until(first, "session.created")
            async with server.ws() as second:
                error = await recv_event(second)
                assert (
                    error["type"] == "error" and error["error"]["code"] == "session_limit_reached"
                )
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await second.recv()
                assert closed.value.rcvd.code == 1013
        async with server.ws() as third:  # the slot is free again
            assert (await recv_event(third))["type"] == "session.created"
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(server.metrics_url)).text
        assert 'omni_connections_refused_total{reason="session_limit"} 1.0' in metrics


async def test_session_length_cap(start_server: Any) -> None:
    async with start_server(max_session_seconds=0.5) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == "session_expired" and "0.5 s" in error["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv_event(ws)
        assert closed.value.rcvd.code == 1000


async def test_buffered_audio_cap(start_server: Any) -> None:
    async with start_server(max_buffered_audio_seconds=1.0) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(ws, {"type": "session.update", "session": {"turn_detection": None}})
        await recv_until(ws, "session.updated")
        for index in range(3):
            await send_event(
                ws,
                {
                    "type": "input_audio_buffer.append",
                    "audio": b64(silence(600)),
                    "event_id": f"a{index}",
                },
            )
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert (error["code"], error["event_id"]) == ("input_audio_buffer_full", "a1")
        await send_event(ws, {"type": "input_audio_buffer.commit"})
        assert (await recv_event(ws))["type"] == "input_audio_buffer.committed"


async def test_message_size_cap_and_hard_ceiling(start_server: Any) -> None:
    cap = 16 * 1024
    async with start_server(max_message_bytes=cap) as server:
        async with server.ws() as ws:
            await recv_until(ws, "session.created")
            await send_event(
                ws,
                {
                    "type": "input_audio_buffer.append",
                    "audio": b64(silence(500)),
                    "event_id": "big",
                },
            )
            error = (await recv_until(ws, "error"))[-1]["error"]
            assert (error["code"], error["event_id"]) == ("message_too_large", "big")
        # past the transport's ceiling (a megabyte over the cap) the socket is closed instead
        async with server.ws(max_size=None) as ws:
            await recv_until(ws, "session.created")
            await ws.send("x" * (cap + (2 << 20)))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await recv_event(ws)
            assert closed.value.rcvd.code == 1009


# -- readiness


@asynccontextmanager
async def slow_engine(loaded: asyncio.Event) -> AsyncIterator[FakeEngine]:
    await loaded.wait()
    yield FakeEngine()


@asynccontextmanager
async def broken_engine() -> AsyncIterator[FakeEngine]:
    raise RuntimeError("no GPU here")
    yield FakeEngine()  # pragma: no cover


async def test_healthz_waits_for_the_engine() -> None:
    loaded = asyncio.Event()
    settings = Settings(port=0, metrics_port=0, api_keys=[API_KEY])
    app = create_app(settings, engine_factory=lambda: slow_engine(loaded))
    server = uvicorn.Server(server_config(settings, app, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, no event)
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            loading = await http.get(f"http://127.0.0.1:{port}/healthz")
            assert (loading.status_code, loading.json()["status"]) == (503, "loading")
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/v1/realtime", additional_headers=headers
            ) as ws:
                assert (await recv_event(ws))["error"]["code"] == "server_not_ready"
            loaded.set()
            await asyncio.wait_for(app.state.gateway.ready.wait(), 5)
            assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    finally:
        server.should_exit = True
        await task


async def test_healthz_reports_a_failed_engine() -> None:
    app = create_app(Settings(metrics_port=0), engine_factory=broken_engine)
    async with app.router.lifespan_context(app):
        for _ in range(100):
            if app.state.gateway.engine_error:
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            failed = await client.get("/healthz")
    assert failed.status_code == 503 and "no GPU here" in failed.json()["error"]


# -- the engine's side


class RefusingEngine(FakeEngine):
    async def open_session(self, session_id: str, options: Any) -> None:
        raise EngineError("the engine is at its session limit")


@asynccontextmanager
async def refusing_engine() -> AsyncIterator[FakeEngine]:
    yield RefusingEngine()


async def test_engine_refusing_a_session_is_reported_and_frees_the_slot() -> None:
    async with running_server(refusing_engine, max_sessions=1) as server:
        for _ in range(2):  # the second attempt would hit the cap if the slot leaked
            async with server.ws() as ws:
                error = await recv_event(ws)
                assert (
                    error["error"]["code"] == "engine_error"
                    and "limit" in error["error"]["message"]
                )
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await recv_event(ws)
                assert closed.value.rcvd.code == 1011


async def test_hanging_up_mid_reply_releases_everything(server: Any) -> None:
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_audio.delta")
    for _ in range(200):
        if not server.gateway.sessions:
            break
        await asyncio.sleep(0.01)
    assert not server.gateway.sessions
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(server.metrics_url)).text
    assert "omni_sessions_active 0.0" in metrics
    if isinstance(server.engine, FakeEngine):
        (session_id,) = server.engine.sessions
        assert session_id in server.engine.closed and ("cancel", session_id) in server.engine.calls
        assert server.engine.violations == []


async def test_client_secrets_refuse_bad_bodies(server: Any) -> None:
    url = f"http://127.0.0.1:{server.port}/v1/realtime/client_secrets"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient() as http:
        for body, param in [
            (b"{not json", None),
            (b'{"expires_after": {"anchor": "created_at", "seconds": 5}}', "expires_after.seconds"),
            (b'{"expires_after": 3}', "expires_after"),
        ]:
            reply = await http.post(url, content=body, headers=headers)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
        default = await http.post(url, headers=headers)
    assert default.status_code == 200
    assert default.json()["session"]["type"] == "realtime"
