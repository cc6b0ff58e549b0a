"""Fuzzing the running gateway (scripted fake engine): generated WebSocket messages, mutated
SDP offers and HTTP requests to every route. Whatever comes in: no 5xx, no hang, /healthz
answers throughout, and every session is released afterwards.

The default suite sends about 1,000 inputs; `-m slow` sends over 10,000. hypothesis runs
synchronous test bodies, so the server runs in a thread of its own with its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import websockets
from fake_engine import fake_engine
from fuzz_inputs import API_KEY, CHROMIUM_LIKE_OFFER, http_requests, sdp_offers, ws_messages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from realtime_helpers import RunningServer, running_server
from websockets.sync.client import connect

T = TypeVar("T")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STEP_TIMEOUT = 20.0  # one input's answer; far above what any takes, so a hang fails
# messages per WebSocket example, and examples per suite: about 1,000 inputs by default
MESSAGES = 8
DEFAULT = {"ws": 120, "sdp": 150, "http": 300}
SLOW = {"ws": 1500, "sdp": 1500, "http": 3000}


class ServerThread:
    """`running_server` on an event loop in a thread of its own."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.server: RunningServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(120), "the server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with running_server(fake_engine, **self.settings) as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def open_sessions(self) -> int:
        assert self.server is not None
        return len(self.server.gateway.sessions)


@pytest.fixture(scope="module")
def served() -> Iterator[ServerThread]:
    with ServerThread(
        max_sessions=64, call_connect_timeout_seconds=2.0, http_header_timeout_seconds=5.0
    ) as thread:
        yield thread


@pytest.fixture(scope="module")
def http(served: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=STEP_TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def offers(served: ServerThread) -> list[str]:
    """A real aiortc offer (audio, video, a data channel) and a Chromium-shaped one."""

    async def aiortc_offer() -> str:
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return [served.run(aiortc_offer()), CHROMIUM_LIKE_OFFER]


def healthy(http: httpx.Client) -> None:
    reply = http.get("/healthz")
    assert reply.status_code == 200, reply.text


def wait_released(served: ServerThread, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while served.open_sessions():
        assert time.monotonic() < deadline, f"{served.open_sessions()} sessions never released"
        time.sleep(0.05)


def all_released(served: ServerThread, http: httpx.Client) -> None:
    wait_released(served)
    assert served.server is not None
    assert served.server.gateway._slots == 0
    assert "omni_sessions_active 0.0" in http.get(served.server.metrics_url).text


def examples(count: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- WebSocket events


def one_connection(served: ServerThread, http: httpx.Client, messages: list[str]) -> None:
    """Send the messages on a new session; a sentinel's answer proves each was handled."""
    url = f"ws://127.0.0.1:{served.port}/v1/realtime"
    with connect(url, additional_headers=AUTH, open_timeout=STEP_TIMEOUT, max_size=None) as ws:
        first = ws.recv(timeout=STEP_TIMEOUT)
        assert '"session.created"' in first, first[:200]
        for message in messages:
            ws.send(message)
        ws.send('{"type": "conversation.item.retrieve", "item_id": "sentinel", "event_id": "s"}')
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            try:
                event = ws.recv(timeout=max(deadline - time.monotonic(), 0.01))
            except websockets.ConnectionClosed as closed:
                # the only way a session may end here: a generated input it cannot survive
                # would be a bug; the server never closes a session for bad input
                raise AssertionError(f"the session ended: {closed}") from None
            if '"event_id":"s"' in event and '"item_not_found"' in event:
                break
    healthy(http)


SIZES = [pytest.param(DEFAULT, id="default"), pytest.param(SLOW, id="long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("size", SIZES)
def test_fuzz_websocket_events(
    served: ServerThread, http: httpx.Client, size: dict[str, int]
) -> None:
    @examples(size["ws"])
    @given(st.lists(ws_messages, min_size=1, max_size=MESSAGES))
    def run(messages: list[str]) -> None:
        one_connection(served, http, messages)

    run()
    all_released(served, http)


# -- SDP offers


def post_offer(http: httpx.Client, offer: str) -> None:
    headers = {**AUTH, "Content-Type": "application/sdp"}
    reply = http.post(
        "/v1/realtime/calls", content=offer.encode("utf-8", "replace"), headers=headers
    )
    assert reply.status_code in (201, 400, 413), (reply.status_code, reply.text[:300])
    if reply.status_code == 201:
        assert reply.text.startswith("v=0")
        assert http.delete(reply.headers["location"], headers=AUTH).status_code == 204
    else:
        assert reply.json()["error"]["code"] in ("invalid_sdp", "request_too_large")


@pytest.mark.parametrize("size", SIZES)
def test_fuzz_sdp_offers(
    served: ServerThread, http: httpx.Client, offers: list[str], size: dict[str, int]
) -> None:
    @examples(size["sdp"])
    @given(sdp_offers(offers))
    def run(offer: str) -> None:
        post_offer(http, offer)

    run()
    healthy(http)
    all_released(served, http)


# -- HTTP requests to every route


@pytest.mark.parametrize("size", SIZES)
def test_fuzz_http_requests(served: ServerThread, http: httpx.Client, size: dict[str, int]) -> None:
    @examples(size["http"])
    @given(http_requests)
    def run(request: Any) -> None:
        reply = http.request(
            request.method, request.path, headers=request.headers, content=request.body
        )
        assert reply.status_code < 500, (request, reply.status_code, reply.text[:300])
        location = reply.headers.get("location", "")
        if reply.status_code == 201 and location.startswith("/v1/realtime/calls/"):
            http.delete(location, headers=AUTH)

    run()
    healthy(http)
    all_released(served, http)
