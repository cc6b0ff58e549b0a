"""The /v1/realtime WebSocket: auth and admission, then pump messages to and from a session.

All call logic lives in `RealtimeSession`; this module only moves JSON text between the
socket and the session, encodes reply audio as delta events, and turns refusals into
errors a client can read:
- a missing, wrong, altered or expired key: HTTP 401 before the upgrade (nothing is
  accepted, no model work); a client secret that has opened all its sessions, the same
  (a session is counted only once the other checks below have passed);
- no engine yet, the session cap reached, or the server draining for a shutdown: the socket
  is accepted just long enough to send an `error` event (browsers cannot read a refused
  handshake), then closed with 1013 ("try again later").
A call ended by a shutdown gets a `server_shutting_down` error, then a 1001 ("going away")
close. A client that stops reading (its session's outbox overflowed, or one send waited
`max_client_lag_seconds`) gets a `client_not_reading` error if it can still take one, then
1008 ("policy violation"); if even the close cannot be written, the connection is aborted,
since a polite close would wait behind the unread data forever. Log lines from the
session's tasks carry its id (`omni.logs.bind_session`).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from omni.engine.api import EngineCapacityError, EngineError
from omni.gateway.auth import BETA_SUBPROTOCOL, Denied, bearer_token, subprotocol_key
from omni.gateway.http_limits import ABORT_EXTENSION
from omni.gateway.state import SHUTTING_DOWN, Gateway, openai_error
from omni.logs import bind_session
from omni.session.client_events import MAX_MODEL_NAME
from omni.session.errors import RealtimeError
from omni.session.outbox import CLIENT_NOT_READING
from omni.session.outputs import AudioOut, Closed
from omni.session.session import RealtimeSession

GOING_AWAY = 1001
POLICY_VIOLATION = 1008
CLOSE_WAIT_S = 1.0  # a lagging client gets this long to take its error and the close
TRY_AGAIN_LATER = 1013
INTERNAL_ERROR = 1011


async def realtime_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    offered: list[str] = list(websocket.scope.get("subprotocols", []))
    grant = gateway.keys.check(bearer_token(websocket.headers) or subprotocol_key(offered))
    if isinstance(grant, Denied):
        await websocket.send_denial_response(gateway.refuse_key(grant))
        return
    if gateway.draining:
        gateway.metrics.connections_refused.labels("draining").inc()
        await _refuse(
            websocket,
            offered,
            SHUTTING_DOWN,
            "the server is shutting down; reconnect to reach another one",
        )
        return
    engine = gateway.engine
    if engine is None:
        gateway.metrics.connections_refused.labels("not_ready").inc()
        await _refuse(
            websocket, offered, "server_not_ready", "the model is still loading; try again shortly"
        )
        return
    model = websocket.query_params.get("model")
    if model is not None and len(model) > MAX_MODEL_NAME:
        await websocket.accept(_subprotocol(offered))
        message = f"the model name is over {MAX_MODEL_NAME} characters"
        await _send(websocket, RealtimeError("invalid_value", message, param="model").to_event())
        await websocket.close(POLICY_VIOLATION, message)
        return
    if not gateway.take_slot():
        gateway.metrics.connections_refused.labels("session_limit").inc()
        limit = gateway.settings.max_sessions
        await _refuse(
            websocket,
            offered,
            "session_limit_reached",
            f"the server is at its limit of {limit} sessions",
        )
        return
    if used_up := gateway.keys.use(grant):  # counted only once the session is sure to open
        gateway.release_slot()
        await websocket.send_denial_response(gateway.refuse_key(used_up))
        return
    try:
        beta = (
            "realtime=v1" in websocket.headers.get("openai-beta", "") or BETA_SUBPROTOCOL in offered
        )
        session = RealtimeSession(
            engine,
            gateway.settings,
            gateway.metrics,
            model=model,
            shape="beta" if beta else "ga",
            initial=grant.session,
            transcriber=gateway.transcriber,
            voices=gateway.voices,
        )
        bind_session(session.id)  # this connection's task, and the session's tasks started below
        await websocket.accept(_subprotocol(offered))
        try:
            await session.start()
        except EngineError as exc:
            # at capacity: the model's KV memory is reserved by other calls; try again later
            full = isinstance(exc, EngineCapacityError)
            code = "server_at_capacity" if full else "engine_error"
            await _send(websocket, RealtimeError(code, str(exc), type="server_error").to_event())
            await websocket.close(TRY_AGAIN_LATER if full else INTERNAL_ERROR)
            return
        gateway.sessions.add(session)
        try:
            await _pump(websocket, session)
        finally:
            gateway.sessions.discard(session)
    finally:
        gateway.release_slot()


async def _pump(websocket: WebSocket, session: RealtimeSession) -> None:
    """Read client messages into the session until either side ends it."""
    writer = asyncio.create_task(_write(websocket, session))
    try:
        while not writer.done():
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            await session.handle_message(text if text is not None else message.get("bytes", b""))
    except (WebSocketDisconnect, RuntimeError):  # the peer went away mid-receive
        pass
    finally:
        await session.close("client_closed")
        await writer


async def _write(websocket: WebSocket, session: RealtimeSession) -> None:
    lag = session.settings.max_client_lag_seconds
    while True:
        out = await session.outbox.get()
        try:
            if isinstance(out, Closed):
                if websocket.application_state == WebSocketState.CONNECTED:
                    await _close(websocket, out.reason)
                return
            event = session.render_audio(out) if isinstance(out, AudioOut) else out
            await asyncio.wait_for(_send(websocket, event), lag)
        except TimeoutError:  # the socket stayed full: the client is not reading
            await session.close(CLIENT_NOT_READING)
            _abort(websocket)
            return
        except (WebSocketDisconnect, RuntimeError):  # closed under us: the reader will notice
            return


async def _close(websocket: WebSocket, reason: str) -> None:
    codes = {SHUTTING_DOWN: GOING_AWAY, CLIENT_NOT_READING: POLICY_VIOLATION}
    try:
        await asyncio.wait_for(websocket.close(codes.get(reason, 1000), reason), CLOSE_WAIT_S)
    except TimeoutError:
        _abort(websocket)


def _abort(websocket: WebSocket) -> None:
    """Drop the connection now (unsent data and all); the reader then sees a disconnect."""
    abort = websocket.scope.get("extensions", {}).get(ABORT_EXTENSION)
    if abort is not None:
        abort["abort"]()


async def _send(websocket: WebSocket, event: dict[str, object]) -> None:
    await websocket.send_text(json.dumps(event, separators=(",", ":")))


def _subprotocol(offered: list[str]) -> str | None:
    # browsers offer ["realtime", "openai-insecure-api-key.<key>", ...]; echo the first
    return "realtime" if "realtime" in offered else None


async def _refuse(websocket: WebSocket, offered: list[str], code: str, message: str) -> None:
    await websocket.accept(_subprotocol(offered))
    await _send(websocket, RealtimeError(code, message, type="server_error").to_event())
    await websocket.close(TRY_AGAIN_LATER, message[:120])
