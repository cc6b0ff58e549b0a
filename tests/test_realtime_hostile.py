"""Hostile clients: each input class gets a clear answer, costs bounded resources, and the
server goes on serving others. Against the running server with the scripted fake engine."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from fake_engine import FakeEngine, fake_engine
from realtime_helpers import (
    API_KEY,
    b64,
    data_url,
    image_bytes,
    recv_event,
    recv_until,
    running_server,
    send_event,
    silence,
)

from omni.gateway.playout import RATE, ReplyAudioTrack
from omni.session.outbox import CLIENT_NOT_READING, Outbox
from omni.session.outputs import AudioOut, Closed

SECRETS = "/v1/realtime/client_secrets"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def error_for(ws: websockets.ClientConnection, message: str) -> dict[str, Any]:
    await ws.send(message)
    return (await recv_until(ws, "error"))[-1]["error"]


async def still_answers(ws: websockets.ClientConnection) -> None:
    """The session goes on: a plain event still gets its answer."""
    await send_event(ws, {"type": "conversation.item.retrieve", "item_id": "nope"})
    assert (await recv_until(ws, "error"))[-1]["error"]["code"] == "item_not_found"


# -- JSON and types


async def test_deep_huge_and_non_finite_json_get_errors_and_the_session_goes_on() -> None:
    async with running_server(fake_engine, max_json_depth=16) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        deep = '{"type": "session.update", "event_id": "deep", "session": ' + "[" * 100_000
        error = await error_for(ws, deep + "]" * 100_000 + "}")
        assert (error["code"], error["event_id"]) == ("invalid_json", "deep")
        assert "16 levels" in error["message"]
        # just under the limit parses (and is then a plain validation error)
        ok_depth = '{"type": "session.update", "session": {"tools": ' + "[" * 13 + "]" * 13 + "}}"
        error = await error_for(ws, ok_depth)
        assert (error["code"], error["param"]) == ("invalid_value", "session.tools.0")
        speed = {"type": "session.update", "session": {"audio": {"output": {"speed": "NaN"}}}}
        nan = json.dumps(speed).replace('"NaN"', "NaN")
        error = await error_for(ws, nan)
        assert error["code"] == "invalid_json" and "NaN" in error["message"]
        as_string = {"type": "conversation.item.truncate", "item_id": "x", "content_index": "0",
                     "audio_end_ms": 0}
        error = await error_for(ws, json.dumps(as_string))
        assert (error["code"], error["param"]) == ("invalid_value", "content_index")
        huge_model = {"type": "session.update", "session": {"model": "m" * 4_000_000}}
        error = await error_for(ws, json.dumps(huge_model))
        assert error["param"] == "session.model" and len(json.dumps(error)) < 1000
        huge_type = {"type": "x" * 1_000_000, "event_id": "e" * 1000}
        error = await error_for(ws, json.dumps(huge_type))
        assert error["code"] == "unknown_event" and len(json.dumps(error)) < 1000
        assert error["event_id"] is None  # too long to echo
        await still_answers(ws)
        # a model name in the URL is echoed in every session object: bounded too
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(
                server.ws_url + "m" * 5000, additional_headers=AUTH
            ) as long_name:
                assert (await recv_event(long_name))["error"]["param"] == "model"
                await recv_event(long_name)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_numbers_as_strings_are_refused_in_client_secrets() -> None:
    async with running_server(fake_engine) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            body = {"expires_after": {"anchor": "created_at", "seconds": "60"}}
            reply = await http.post(SECRETS, json=body, headers=AUTH)
            assert reply.status_code == 400
            assert reply.json()["error"]["param"] == "expires_after.seconds"


# -- bounded state


@asynccontextmanager
async def stalled_engine() -> AsyncIterator[FakeEngine]:
    """A fake engine whose audio appends wait until `engine.go` is set (a stuck model)."""
    engine = FakeEngine()
    engine.go = asyncio.Event()  # type: ignore[attr-defined]
    append = engine.append_audio

    async def slow_append(session_id: str, pcm: np.ndarray, timestamp: float | None = None) -> None:
        await engine.go.wait()  # type: ignore[attr-defined]
        await append(session_id, pcm, timestamp)

    engine.append_audio = slow_append  # type: ignore[method-assign]
    yield engine


async def test_a_stalled_engine_refuses_input_past_the_call_cap_then_recovers() -> None:
    async with running_server(stalled_engine, max_engine_calls=16) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(ws, {"type": "session.update", "session": {"turn_detection": None}})
        await recv_until(ws, "session.updated")
        for index in range(40):
            append = {"type": "input_audio_buffer.append", "audio": b64(silence(20))}
            await send_event(ws, {**append, "event_id": f"a{index}"})
        error = (await recv_until(ws, "error"))[-1]["error"]
        # the cap counts engine calls: one per append that got audio past the resampler
        assert error["code"] == "engine_busy" and error["event_id"] in {f"a{i}" for i in range(40)}
        server.engine.go.set()  # type: ignore[attr-defined]
        await send_event(ws, {"type": "input_audio_buffer.commit"})
        assert (await recv_until(ws, "input_audio_buffer.committed"))[-1]["item_id"]


async def test_a_turn_holds_at_most_its_media_budget() -> None:
    limit = 1024 * 1024
    async with running_server(fake_engine, max_turn_input_bytes=limit) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        image = data_url(image_bytes(400, 300))  # 360 KB as RGB
        item = {"type": "message", "role": "user",
                "content": [{"type": "input_image", "image_url": image}]}
        for index in range(3):  # two fit (720 KB), a third would pass 1 MiB
            await send_event(ws, {"type": "conversation.item.create", "item": item})
            events = await recv_until(ws, "conversation.item.done" if index < 2 else "error")
        assert events[-1]["error"]["code"] == "turn_input_full"
        await send_event(ws, {"type": "response.create"})  # answering the turn empties it
        await recv_until(ws, "response.done")
        await send_event(ws, {"type": "conversation.item.create", "item": item})
        await recv_until(ws, "conversation.item.done")


async def test_large_images_are_kept_at_the_pixel_cap() -> None:
    async with running_server(fake_engine, image_max_pixels=100_000) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        image = data_url(image_bytes(2000, 1000))
        item = {"type": "message", "role": "user",
                "content": [{"type": "input_image", "image_url": image}]}
        await send_event(ws, {"type": "conversation.item.create", "item": item})
        await recv_until(ws, "conversation.item.done")
        text_only = {"output_modalities": ["text"]}
        await send_event(ws, {"type": "response.create", "response": text_only})
        await recv_until(ws, "response.done")
        engine: FakeEngine = server.engine  # type: ignore[assignment]
        ((width, height),) = engine.conversation().history[-1][0].images
        assert width * height <= 100_000 and abs(width - 2 * height) <= 1


async def raw_websocket(port: int) -> socket.socket:
    """A WebSocket handshake on a socket with a tiny receive buffer, then never read again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n",
    )
    assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
    return sock


def masked_text(text: str) -> bytes:
    """One client text frame (clients must mask; a zero mask keeps the payload as is)."""
    data = text.encode()
    if len(data) < 126:
        return bytes([0x81, 0x80 | len(data)]) + bytes(4) + data
    if len(data) < 1 << 16:
        return bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big") + bytes(4) + data
    return bytes([0x81, 0x80 | 127]) + len(data).to_bytes(8, "big") + bytes(4) + data


async def test_a_client_that_never_reads_is_closed_and_holds_no_memory() -> None:
    engine = partial(fake_engine, token_delay=0.0, filler_tokens=30_000)  # ~10 min of audio
    settings = {"max_outbox_bytes": 256 * 1024, "max_client_lag_seconds": 1.0}
    async with running_server(engine, **settings) as server:
        sock = await raw_websocket(server.port)
        try:
            request = masked_text(json.dumps({"type": "response.create"}))
            await asyncio.get_running_loop().sock_sendall(sock, request)
            gave_up = server.gateway.metrics.errors.labels(CLIENT_NOT_READING)
            peak, deadline = 0, time.monotonic() + 30
            while not gave_up._value.get() or server.gateway.sessions:
                # the outbox never holds much more than its cap
                peak = max([peak] + [s.outbox.queued_bytes for s in server.gateway.sessions])
                assert time.monotonic() < deadline, "the session was not closed"
                await asyncio.sleep(0.01)
            assert peak <= 256 * 1024 + 200_000  # the cap, plus at most one event over it
            async with httpx.AsyncClient() as http:
                base = f"http://127.0.0.1:{server.port}"
                assert (await http.get(f"{base}/healthz")).json()["sessions"] == 0
                metrics = (await http.get(server.metrics_url)).text
            assert f'omni_client_errors_total{{code="{CLIENT_NOT_READING}"}} 1.0' in metrics
            assert "omni_sessions_active 0.0" in metrics
        finally:
            sock.close()


async def test_a_slow_reader_gets_the_reason_and_1008() -> None:
    outbox_closed: list[str] = []
    outbox = Outbox(64 * 1024, 60.0, lambda: outbox_closed.append("overflow"))
    pcm = np.zeros(48_000, np.int16)  # 2 s: 128 KB as base64
    outbox.put_nowait({"type": "session.created"})
    outbox.put_nowait(AudioOut("resp", "item", pcm, 0))
    assert outbox_closed == ["overflow"] and outbox.qsize() == 1
    outbox.put_nowait(AudioOut("resp", "item", pcm, 24_000))  # dropped once overflowed
    outbox.put_nowait(Closed(CLIENT_NOT_READING))
    error = await outbox.get()
    assert error["type"] == "error" and error["error"]["code"] == CLIENT_NOT_READING
    assert await outbox.get() == Closed(CLIENT_NOT_READING)
    # over a real socket: a client that reads, but only after the session gave up on it
    engine = partial(fake_engine, token_delay=0.0, filler_tokens=30_000)
    settings = {"max_outbox_bytes": 256 * 1024, "max_client_lag_seconds": 2.0}
    async with running_server(engine, **settings) as server:
        async with server.ws(max_queue=1) as ws:
            await recv_until(ws, "session.created")
            await send_event(ws, {"type": "response.create"})
            await until(lambda: not server.gateway.sessions)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await recv_event(ws)
            assert closed.value.rcvd is None or closed.value.rcvd.code == 1008


def test_the_playout_queue_is_bounded_and_says_so() -> None:
    events: list[dict[str, Any]] = []
    track = ReplyAudioTrack(events.append, max_queued_seconds=0.5)
    second = np.zeros(24_000, np.int16)
    for index in range(3):
        track.play(AudioOut("resp", "item", second, index * 24_000))
    assert track._queued <= 0.5 * RATE
    assert [e["error"]["code"] for e in events] == ["playout_full"]  # once per item
    track.clear()
    track.play(AudioOut("resp", "item2", second[:2400], 0))
    assert track._queued > 0


# -- HTTP limits, before any body is read


async def exchange(port: int, request: bytes, *, pause: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if pause:
        await asyncio.sleep(pause)
    reply = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return reply


async def test_http_head_and_body_limits() -> None:
    settings = {"http_header_timeout_seconds": 1.0, "http_body_timeout_seconds": 1.0,
                "max_header_count": 20}
    async with running_server(fake_engine, **settings) as server:
        port = server.port
        big_head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
        assert (await exchange(port, big_head)).startswith(b"HTTP/1.1 431")
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(30))
        reply = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 431") and b"too_many_headers" in reply
        # a head that trickles in is cut off, a silent connection hung up on
        reply = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", pause=1.5)
        assert reply.startswith(b"HTTP/1.1 408")
        assert await exchange(port, b"", pause=1.5) == b""
        # a 50 MiB body is refused from its Content-Length, before it is sent
        head = (b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (50 << 20))
        reply = await exchange(port, head)
        assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply
        # a chunked body is read only up to the cap
        chunk = b"a" * 70_000
        chunked = (
            b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/sdp\r\n\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        )
        assert (await exchange(port, chunked)).startswith(b"HTTP/1.1 413")
        # a body that stops halfway
        slow = (b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 100\r\n\r\n{")
        reply = await exchange(port, slow, pause=1.5)
        assert reply.startswith(b"HTTP/1.1 408")
        async with httpx.AsyncClient() as http:  # and all the while, others are served
            assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200


# -- WebRTC offers


async def test_calls_that_never_connect_release_their_slot() -> None:
    from aiortc import RTCPeerConnection

    async with running_server(fake_engine, max_sessions=3, call_connect_timeout_seconds=1.0) as s:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.port}", timeout=20) as http:
            for kind in ("datachannel", "video", "audio"):
                pc = RTCPeerConnection()
                if kind == "datachannel":
                    pc.createDataChannel("oai-events")
                else:
                    pc.addTransceiver(kind, direction="sendrecv")
                await pc.setLocalDescription(await pc.createOffer())
                offer = pc.localDescription.sdp
                await pc.close()  # the caller is gone before the answer: nothing connects
                headers = {**AUTH, "Content-Type": "application/sdp"}
                reply = await http.post("/v1/realtime/calls", content=offer, headers=headers)
                assert reply.status_code == 201, (kind, reply.text)
            await until(lambda: not s.gateway.sessions, timeout=10)
        assert s.gateway._slots == 0


MANY_MLINES = "\r\n".join(
    ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    + [f"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{i}" for i in range(20)]
) + "\r\n"


async def test_offers_with_too_many_media_sections_get_400() -> None:
    async with running_server(fake_engine) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            headers = {**AUTH, "Content-Type": "application/sdp"}
            reply = await http.post("/v1/realtime/calls", content=MANY_MLINES, headers=headers)
        assert reply.status_code == 400 and "20 media sections" in reply.json()["error"]["message"]
