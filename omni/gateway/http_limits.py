"""HTTP limits on every endpoint, checked before a request body is read.

Two layers, because a request can be hostile before the app sees it:
- the connection (`limited_protocols`: uvicorn's own h11 and websockets protocols, extended):
  a request head (request line and headers, an HTTP request or a WebSocket handshake) larger
  than `max_header_bytes` gets 431, and one not received in full within
  `http_header_timeout_seconds` gets 408, so a client trickling headers cannot hold a
  connection for minutes. WebSocket connections also carry a way to abort them
  (`ABORT_EXTENSION`), for a client that stopped reading: closing politely would wait
  behind the unread data forever.
- the app (`RequestLimits`, plain ASGI): more than `max_header_count` headers gets 431, a
  `Content-Length` over `max_request_body_bytes` gets 413 before a byte of the body is read,
  a body without one is read only up to that cap (then 413), and a body not received within
  `http_body_timeout_seconds` gets 408. The body is handed on whole, so no route reads more.
Every refusal is OpenAI's `{"error": ...}` JSON, as the routes' own errors are.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from omni.gateway.state import openai_error
from omni.settings import Settings

ABORT_EXTENSION = "omni.abort"  # scope["extensions"][...]["abort"]: drop the connection now
_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def _raw_error(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for refusals made before the app has a request."""
    body = json.dumps(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _LimitedH11(H11Protocol):
    max_head_bytes = 16 * 1024
    head_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0  # of the request head being received
        self._head_tail = b""  # its last bytes, for an end of head split across reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            # measured here, before h11 sees it: h11 caps only heads it has not parsed yet
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            size = self._head_bytes + (
                end + 4 - len(self._head_tail) if end >= 0 else len(data)
            )
            if size > self.max_head_bytes:
                self._refuse(
                    431,
                    "header_too_large",
                    f"the request head is over the {self.max_head_bytes}-byte limit",
                )
                return
            self._head_bytes, self._head_tail = size, seen[-3:]
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived
            self._head_bytes, self._head_tail = 0, b""
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and self._head_bytes:
            self._refuse(
                408,
                "request_timeout",
                f"the request head did not arrive within {self.head_timeout_s:g} s",
            )
        elif self.conn.their_state is h11.IDLE:  # nothing sent at all: just hang up
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_error(status, code, message))
            self.transport.close()


class _AbortableWebSocket(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][ABORT_EXTENSION] = {"abort": self.transport.abort}


def limited_protocols(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config options: the HTTP and WebSocket protocols with the limits above."""
    http = type(
        "LimitedH11",
        (_LimitedH11,),
        {
            "max_head_bytes": settings.max_header_bytes,
            "head_timeout_s": settings.http_header_timeout_seconds,
        },
    )
    # h11's own cap is a backstop above ours, so ours (with its clear 431) answers first
    return {
        "http": http,
        "ws": _AbortableWebSocket,
        "h11_max_incomplete_event_size": settings.max_header_bytes + 64 * 1024,
    }


class RequestLimits:
    """Header count and body size and time limits for every HTTP route (see above)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_headers = settings.max_header_count
        self.max_body = settings.max_request_body_bytes
        self.body_timeout_s = settings.http_body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            message = f"{len(headers)} request headers, over the limit of {self.max_headers}"
            await openai_error(431, "too_many_headers", message)(scope, receive, send)
            return
        lengths = [value for name, value in headers if name == b"content-length"]
        if lengths:
            declared = lengths[0].strip()
            if len(lengths) > 1 or not declared.isdigit():
                await openai_error(400, "invalid_request", "a malformed Content-Length")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_body:
                await self._too_large(scope, receive, send)
                return
        body = await self._read_body(receive)
        if isinstance(body, int):  # a refusal's status
            if body == 413:
                await self._too_large(scope, receive, send)
            else:
                message = f"the request body did not arrive within {self.body_timeout_s:g} s"
                await openai_error(408, "request_timeout", message)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | int:
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                return 408
            if message["type"] != "http.request":  # the client left: hand the app nothing
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over the {self.max_body}-byte limit"
        response = openai_error(413, "request_too_large", message)
        response.headers["Connection"] = "close"  # the unread body is not worth draining
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields `body` whole once, then whatever the connection says next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
