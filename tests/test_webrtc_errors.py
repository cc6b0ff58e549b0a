"""Calls that go wrong: bad requests get clear HTTP errors, callers who leave (politely or
not) are torn down, and the server goes on taking calls."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from typing import Any

import httpx
import pytest
from fake_engine import fake_engine
from realtime_helpers import API_KEY, RunningServer, running_server

from omni.bench.calls import CallClient
from omni.gateway.webrtc import ice_servers
from omni.settings import Settings

CALLS = "/v1/realtime/calls"
SDP = {"Content-Type": "application/sdp", "Authorization": f"Bearer {API_KEY}"}


def http(server: RunningServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=20)


async def offer() -> str:
    """A real offer (audio and a data channel), as a browser would send."""
    client = CallClient("http://unused")
    client.pc.addTrack(client.mic)
    client.pc.createDataChannel("oai-events")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    sdp = client.pc.localDescription.sdp
    await client.pc.close()
    return sdp


async def place(server: RunningServer, **kwargs: Any) -> CallClient:
    client = CallClient(f"http://127.0.0.1:{server.port}", API_KEY, **kwargs)
    response = await client.connect()
    assert response.status_code == 201, response.text
    return client


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def error(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


@pytest.fixture
async def server() -> Any:
    async with running_server(fake_engine, max_sessions=1, call_idle_timeout_seconds=1.5) as s:
        yield s


async def test_bad_requests_get_clear_errors(server: RunningServer) -> None:
    sdp = await offer()
    async with http(server) as client:
        wrong_type = await client.post(
            CALLS, content=sdp, headers={**SDP, "Content-Type": "application/json"}
        )
        assert wrong_type.status_code == 415
        assert error(wrong_type)["code"] == "unsupported_content_type"

        no_key = await client.post(CALLS, content=sdp, headers={"Content-Type": "application/sdp"})
        assert no_key.status_code == 401 and error(no_key)["code"] == "invalid_api_key"
        wrong_key = await client.post(
            CALLS, content=sdp, headers={**SDP, "Authorization": "Bearer nope"}
        )
        assert wrong_key.status_code == 401

        for broken in (
            "",
            "hello",
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
            sdp[: len(sdp) // 2],
        ):
            response = await client.post(CALLS, content=broken, headers=SDP)
            assert response.status_code == 400, broken
            assert error(response)["code"] == "invalid_sdp"
        not_utf8 = await client.post(CALLS, content=b"\xff\xfe", headers=SDP)
        assert not_utf8.status_code == 400
        huge = await client.post(CALLS, content="a" * 70_000, headers=SDP)
        assert huge.status_code == 413

        unknown = await client.delete(f"{CALLS}/rtc_nosuchcall", headers=SDP)
        assert unknown.status_code == 404 and error(unknown)["code"] == "call_not_found"
        assert (await client.delete(f"{CALLS}/rtc_nosuchcall")).status_code == 401

    # nothing was left behind: the one slot is free and a real call goes through
    assert server.gateway.sessions == set()
    call = await place(server)
    await call.expect("session.created")
    assert await call.hang_up() == 204


async def test_full_server_refuses_with_503_and_frees_the_slot_on_hang_up(
    server: RunningServer,
) -> None:
    first = await place(server)
    async with http(server) as client:
        refused = await client.post(CALLS, content=await offer(), headers=SDP)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert error(refused)["code"] == "session_limit_reached"
    assert await first.hang_up() == 204
    second = await place(server)
    await second.expect("session.created")
    await second.hang_up()


async def test_caller_closing_without_delete_is_torn_down(server: RunningServer) -> None:
    client = await place(server)
    await client.expect("session.created")
    await client.close()  # DTLS/SCTP goodbye, no DELETE
    await until(lambda: not server.gateway.sessions, timeout=5)
    assert server.engine.closed  # type: ignore[attr-defined]
    again = await place(server)
    await again.hang_up()


VANISHING_CALLER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    async def main(url, key):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(AudioStreamTrack())
        channel = pc.createDataChannel("oai-events")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Authorization": "Bearer " + key, "Content-Type": "application/sdp"}
        async with httpx.AsyncClient() as http:
            answer = await http.post(url, content=pc.localDescription.sdp, headers=headers)
        await pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
        await opened.wait()
        print("up", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_caller_that_vanishes_is_hung_up_after_the_idle_timeout(
    server: RunningServer,
) -> None:
    caller = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        VANISHING_CALLER,
        f"http://127.0.0.1:{server.port}{CALLS}",
        API_KEY,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert caller.stdout is not None
        assert await asyncio.wait_for(caller.stdout.readline(), 30) == b"up\n"
        assert len(server.gateway.sessions) == 1
    finally:
        caller.send_signal(signal.SIGKILL)  # no goodbye of any kind
        await caller.wait()
    gone = time.monotonic()
    await until(lambda: not server.gateway.sessions, timeout=10)
    assert time.monotonic() - gone < 4  # idle timeout 1.5 s
    again = await place(server)
    await again.expect("session.created")
    await again.hang_up()


async def test_session_ending_hangs_up_the_call() -> None:
    async with running_server(fake_engine, max_session_seconds=1.0) as server:
        client = await place(server)
        await client.expect("session.created")
        expired = await client.expect("error", timeout=5)
        assert expired["error"]["code"] == "session_expired"  # the last word arrives first
        await until(lambda: client.pc.connectionState == "closed" or not server.gateway.sessions)
        await until(lambda: not server.gateway.sessions)
        await client.close()


async def test_ice_servers_from_settings_reach_pages_and_the_server() -> None:
    ice: list[dict[str, str | list[str]]] = [{"urls": "stun:127.0.0.1:3478"}]
    rest = {"turn_urls": ["turn:127.0.0.1:3478"], "turn_secret": "s3cret"}
    async with running_server(fake_engine, ice_servers=ice, **rest) as server:
        async with http(server) as client:
            config = await client.get(f"{CALLS}/config", headers=SDP)
            assert (await client.get(f"{CALLS}/config")).status_code == 401
        stun, turn = config.json()["ice_servers"]
        assert stun == ice[0]
        # TURN REST: a fresh time-limited credential, not the secret
        assert turn["urls"] == ["turn:127.0.0.1:3478"] and turn["username"].endswith(":omni")
        assert turn["credential"] and "s3cret" not in turn["credential"]
        assert config.json()["voices"] == ["Chelsie", "Ethan"]
    # the server's own ICE agent gets the same list
    servers = ice_servers(Settings(ice_servers=ice, **rest))
    assert [s.urls for s in servers] == ["stun:127.0.0.1:3478", ["turn:127.0.0.1:3478"]]
    assert servers[1].username and servers[1].credential
    with pytest.raises(ValueError, match="urls"):
        ice_servers(Settings(ice_servers=[{"username": "u"}]))


async def test_client_secret_opens_a_call_with_its_session_config(server: RunningServer) -> None:
    async with http(server) as client:
        secret = await client.post(
            "/v1/realtime/client_secrets",
            json={"session": {"type": "realtime", "audio": {"output": {"voice": "Ethan"}}}},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    caller = CallClient(f"http://127.0.0.1:{server.port}", secret.json()["value"])
    assert (await caller.connect()).status_code == 201
    created = await caller.expect("session.created")
    assert created["session"]["audio"]["output"]["voice"] == "Ethan"
    assert await caller.hang_up() == 204


async def test_no_stun_server_by_default(server: RunningServer) -> None:
    client = await place(server)
    try:
        answer = client.pc.remoteDescription.sdp
        assert "typ host" in answer and "typ srflx" not in answer
    finally:
        await client.hang_up()


async def test_server_shutdown_ends_calls() -> None:
    async with running_server(fake_engine) as server:
        client = await place(server)
        await client.expect("session.created")
    # the server stopped with the call up: the caller is told, nothing hangs
    await until(lambda: client.pc.connectionState in ("closed", "failed"), timeout=10)
    await client.close()


async def test_the_call_page_is_served(server: RunningServer) -> None:
    async with http(server) as client:
        page = await client.get("/")
        script = await client.get("/web/app.js")
        style = await client.get("/web/style.css")
        missing = await client.get("/web/nope.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Video call" in page.text and "web/app.js" in page.text
    assert script.status_code == 200 and "oai-events" in script.text
    assert style.status_code == 200 and missing.status_code == 404
