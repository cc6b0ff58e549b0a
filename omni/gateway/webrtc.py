"""WebRTC calls, signalled the way OpenAI's realtime WebRTC API is:

    POST   /v1/realtime/calls          body: the SDP offer (Content-Type: application/sdp)
                                       201: the SDP answer, Location: /v1/realtime/calls/{id}
    DELETE /v1/realtime/calls/{id}     hang up
    GET    /v1/realtime/calls/config   what a call page needs first: ICE servers, voices

Keys are checked as for the WebSocket (a static key, or an `ek_` client secret whose session
config the call starts with). Only the caller who placed a call (its key or client secret, or
the key that minted that secret) may act on it; anyone else is told it does not exist (404). Each call is one aiortc peer connection and one
`RealtimeSession`: events travel as JSON on the data channel the caller opens, labelled
`oai-events`; the caller's microphone and camera or screen go in through inbound.py; the
reply is played on a paced track (playout.py) that the session clears on barge-in.

A call ends on DELETE, when the caller closes the connection, when ICE fails, when the
session ends (its time cap), when it is not connected within `call_connect_timeout_seconds`
(whatever its offer holds: audio, video, a data channel only), or when the connected caller
has sent no media for `call_idle_timeout_seconds` (a peer that vanished without a word).

Offers are client input like any other: whatever aiortc makes of an unusual one (no audio,
BUNDLE or not, missing or repeated mids, odd codecs), a failure to answer it is a 400 with
aiortc's reason, never a 500, and tearing down a half-made call never fails twice
(`Call.close` is idempotent and finishes every step even when one of them raises).

No public STUN server is contacted unless configured: aiortc adds Google's when given no
list, so it always gets one. Configured STUN/TURN servers (with fresh TURN REST credentials,
turn.py) go both to pages and to the server's own ICE agent, minted per page load and per
call since they expire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter

from omni.engine.api import EngineCapacityError, EngineError
from omni.gateway.auth import Denied, Grant, bearer_token
from omni.gateway.inbound import MicReader, read_video
from omni.gateway.media_clock import CallClock
from omni.gateway.playout import ReplyAudioTrack
from omni.gateway.state import Gateway, openai_error
from omni.gateway.turn import ice_servers_for_client
from omni.session.client_events import MAX_MODEL_NAME
from omni.session.errors import RealtimeError, new_id, quoted
from omni.session.outputs import AudioOut, Closed
from omni.session.session import RealtimeSession
from omni.settings import Settings

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/realtime/calls"
EVENTS_LABEL = "oai-events"
MAX_MEDIA_SECTIONS = 16  # m= lines in one offer: audio, video and a data channel need 3
MAX_INBOX = 256  # client events waiting for the session; more means the caller floods
MAX_EARLY_EVENTS = 256  # server events held until the caller's data channel opens
MAX_CHANNEL_BUFFER = 4 * 1024 * 1024  # unsent event bytes: past this the caller isn't reading
AUDIO_DONE = {"response.output_audio.done", "response.audio.done"}  # GA and beta names
_SOURCE_WEB = Path(__file__).resolve().parents[2] / "web"


class OfferError(ValueError):
    """The offer could not be negotiated (the message says why)."""


def ice_servers(settings: Settings) -> list[RTCIceServer]:
    """The configured STUN/TURN servers (TURN REST credentials minted now) for aiortc."""
    servers = []
    for entry in ice_servers_for_client(settings):
        urls = entry.get("urls")
        if not urls:
            raise ValueError(f"ice_servers: {entry!r} has no 'urls'")
        username, credential = entry.get("username"), entry.get("credential")
        servers.append(
            RTCIceServer(
                urls=urls,  # type: ignore[arg-type]
                username=username if isinstance(username, str) else None,
                credential=credential if isinstance(credential, str) else None,
            )
        )
    return servers


class Call:
    """One caller: the peer connection, its session and the tasks that move media and events."""

    def __init__(
        self,
        gateway: Gateway,
        pc: RTCPeerConnection,
        grant: Grant,
        model: str | None,
        gaps: Counter,
    ) -> None:
        self.id = new_id("rtc")
        self.gateway = gateway
        self.pc = pc
        self.session: RealtimeSession | None = None
        self.track: ReplyAudioTrack | None = None
        self._grant = grant
        self._model = model
        self.on_closed: Callable[[Call], None] | None = None
        self._remote: list[MediaStreamTrack] = []
        self._channel: RTCDataChannel | None = None
        self._early: list[str] = []
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._heard_at = 0.0
        self._connected = asyncio.Event()
        self._closing = False
        self._gaps = gaps

        pc.on("track", self._remote.append)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)

    async def negotiate(self, offer: str) -> str:
        """Take the offer, start the session, return the answer. Raises OfferError, EngineError."""
        sections = sum(line.startswith("m=") for line in offer.splitlines())
        if sections > MAX_MEDIA_SECTIONS:
            raise OfferError(
                f"the SDP offer has {sections} media sections, over the limit of "
                f"{MAX_MEDIA_SECTIONS}"
            )
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        except Exception as exc:  # aiortc raises many kinds on bad SDP
            raise OfferError(f"the SDP offer is invalid: {_reason(exc)}") from exc
        if not self.pc.getTransceivers() and self.pc.sctp is None:
            raise OfferError("the SDP offer has neither media nor a data channel")
        if any(t.kind == "audio" for t in self.pc.getTransceivers()):
            settings = self.gateway.settings
            self.track = ReplyAudioTrack(
                self.send, self._gaps.inc, max_queued_seconds=settings.max_playout_seconds
            )
            try:
                self.pc.addTrack(self.track)
            except Exception as exc:  # e.g. every audio m-line is recvonly or rejected
                raise OfferError(f"no audio can be sent on this offer: {_reason(exc)}") from exc
        gateway = self.gateway
        assert gateway.engine is not None
        self.session = RealtimeSession(
            gateway.engine,
            gateway.settings,
            gateway.metrics,
            model=self._model,
            initial=self._grant.session,
            playout=self.track,
            transcriber=gateway.transcriber,
            voices=gateway.voices,
        )
        await self.session.start()
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:
            raise OfferError(f"no answer to this offer: {_reason(exc)}") from exc
        self._start_tasks(self.session)
        return self.pc.localDescription.sdp

    def owned_by(self, grant: Grant) -> bool:
        """Whether `grant` placed this call (or minted the client secret that did)."""
        return grant.may_manage(self._grant)

    def _start_tasks(self, session: RealtimeSession) -> None:
        settings = session.settings
        tasks = [
            self._drain_outbox(session),
            self._read_events(session),
            self._watch_connect(settings.call_connect_timeout_seconds),
        ]
        mic_taken = False
        clock = CallClock()  # camera frames onto the microphone's time
        for track in self._remote:
            if track.kind == "audio" and not mic_taken:
                mic_taken = True
                tasks.append(MicReader(track, session.push_audio, self._heard, clock).run())
                tasks.append(self._watch_idle(settings.call_idle_timeout_seconds))
            elif track.kind == "video":
                tasks.append(
                    read_video(
                        track,
                        session.push_video_frame,
                        self._heard,
                        clock,
                        settings.video_max_fps,
                        settings.video_max_side,
                    )
                )
            else:
                tasks.append(_discard(track))
        self._tasks = [asyncio.create_task(t) for t in tasks]

    async def close(self, reason: str) -> None:
        """End the call; idempotent, and every step runs even if an earlier one raised."""
        if self._closing:
            return
        self._closing = True
        log.info("call %s: ending (%s)", self.id, reason)
        current = asyncio.current_task()
        others = [t for t in self._tasks if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        steps: list[Callable[[], Awaitable[None]]] = []
        if self.session is not None:
            steps.append(partial(self.session.close, reason))
        # the session's last words (an error saying why) go before the connection closes
        steps += [self._drain_channel, self._stop_track, self.pc.close]
        for step in steps:
            try:
                await step()
            except Exception:  # a half-made call can fail to tear down; finish the rest
                log.exception("call %s: a teardown step failed", self.id)
        if self.on_closed is not None:
            self.on_closed(self)

    async def _stop_track(self) -> None:
        if self.track is not None:
            self.track.stop()

    # -- events

    def send(self, event: dict[str, Any]) -> None:
        text = json.dumps(event, separators=(",", ":"))
        channel = self._channel
        if channel is None:
            if len(self._early) < MAX_EARLY_EVENTS:
                self._early.append(text)
            return
        if channel.readyState != "open":
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            self._spawn_close("client_not_reading")
            return
        channel.send(text)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_LABEL or self._channel is not None:
            return
        self._channel = channel
        channel.on("message", self._on_message)
        early, self._early = self._early, []
        for text in early:
            channel.send(text)

    def _on_message(self, message: str | bytes) -> None:
        self._heard()
        if self._inbox.qsize() >= MAX_INBOX:
            message = f"over {MAX_INBOX} events are waiting; this one was dropped"
            self.send(RealtimeError("too_many_events", message).to_event())
            return
        self._inbox.put_nowait(message)

    async def _read_events(self, session: RealtimeSession) -> None:
        # one at a time, in order, as the session expects
        while True:
            await session.handle_message(await self._inbox.get())

    async def _drain_outbox(self, session: RealtimeSession) -> None:
        while True:
            out = await session.outbox.get()
            if isinstance(out, Closed):
                await self.close(out.reason)
                return
            if isinstance(out, AudioOut):
                if self.track is not None:
                    self.track.play(out)
                continue
            if out["type"] in AUDIO_DONE and self.track is not None:
                self.track.finish(out["item_id"])
            self.send(out)

    async def _drain_channel(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open" or not channel.bufferedAmount:
            return
        drained = asyncio.Event()
        channel.once("bufferedamountlow", drained.set)
        try:
            await asyncio.wait_for(drained.wait(), 1.0)
        except TimeoutError:
            pass

    # -- liveness

    def _heard(self) -> None:
        self._heard_at = time.monotonic()

    async def _watch_connect(self, timeout: float) -> None:
        # every call, whatever its offer holds: one never connected must not keep its slot
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            await self.close("connect_timeout")

    async def _watch_idle(self, timeout: float) -> None:
        # silence counts once media can flow: setting up may take longer than the timeout
        await self._connected.wait()
        self._heard()
        while True:
            silent_for = time.monotonic() - self._heard_at
            if silent_for >= timeout:
                await self.close("client_gone")
                return
            await asyncio.sleep(timeout - silent_for)

    def _on_connection_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()
        if self.pc.connectionState in ("failed", "closed"):
            self._spawn_close(
                "client_gone" if self.pc.connectionState == "closed" else "ice_failed"
            )

    def _spawn_close(self, reason: str) -> None:
        if not self._closing:
            self._tasks.append(asyncio.create_task(self.close(reason)))


async def _discard(track: MediaStreamTrack) -> None:
    """Read a track nobody needs, so aiortc's queue for it stays empty."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass


class Calls:
    """The open calls, by id; the routes that make and end them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        ice_servers(gateway.settings)  # a bad list fails at startup, not on the first call
        self.calls: dict[str, Call] = {}
        self.gaps = Counter(
            "omni_webrtc_playout_gap_frames",
            "20 ms frames of silence sent mid-reply because the reply audio was not there yet.",
            registry=gateway.metrics.registry,
        )

    def _check(self, request: Request) -> Grant | JSONResponse:
        grant = self.gateway.keys.check(bearer_token(request.headers))
        if isinstance(grant, Denied):
            return self.gateway.refuse_key(grant)
        return grant

    async def config(self, request: Request) -> JSONResponse:
        grant = self._check(request)
        if isinstance(grant, JSONResponse):
            return grant
        settings = self.gateway.settings
        return JSONResponse(
            {
                "ice_servers": ice_servers_for_client(settings),
                "voices": list(self.gateway.voices),
                "video": {"max_fps": settings.video_max_fps, "max_side": settings.video_max_side},
            }
        )

    async def create(self, request: Request) -> Response:
        gateway = self.gateway
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/sdp":
            return openai_error(
                415,
                "unsupported_content_type",
                f"send the SDP offer as Content-Type: application/sdp, not {quoted(content_type)}",
            )
        grant = self._check(request)
        if isinstance(grant, JSONResponse):
            return grant
        body = await request.body()  # its size was checked before it was read (http_limits)
        try:
            offer = body.decode()
        except UnicodeDecodeError:
            return openai_error(400, "invalid_sdp", "the SDP offer is not UTF-8 text")
        model = request.query_params.get("model")
        if model is not None and len(model) > MAX_MODEL_NAME:
            message = f"the model name is over {MAX_MODEL_NAME} characters"
            return openai_error(400, "invalid_value", message, "model")
        if gateway.engine is None:
            gateway.metrics.connections_refused.labels("not_ready").inc()
            return _unavailable("server_not_ready", "the model is still loading; try again shortly")
        if not gateway.take_slot():
            gateway.metrics.connections_refused.labels("session_limit").inc()
            limit = gateway.settings.max_sessions
            return _unavailable(
                "session_limit_reached", f"the server is at its limit of {limit} sessions"
            )
        if used_up := gateway.keys.use(grant):  # counted only once the call is sure to start
            gateway.release_slot()
            return gateway.refuse_key(used_up)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers(gateway.settings)))
        call = Call(gateway, pc, grant, model, self.gaps)
        try:
            answer = await call.negotiate(offer)
        except BaseException as exc:  # whatever went wrong, nothing of the call is left
            gateway.release_slot()
            await call.close("refused")
            if isinstance(exc, OfferError):
                return openai_error(400, "invalid_sdp", str(exc))
            if isinstance(exc, EngineCapacityError):
                return openai_error(503, "server_at_capacity", str(exc))
            if isinstance(exc, EngineError):
                return openai_error(500, "engine_error", str(exc))
            if isinstance(exc, Exception):  # aiortc on an offer it half understood
                log.exception("call %s: the offer could not be answered", call.id)
                return openai_error(400, "invalid_sdp", f"no answer to this offer: {_reason(exc)}")
            raise
        assert call.session is not None
        self.calls[call.id] = call
        gateway.sessions.add(call.session)
        call.on_closed = self._forget
        return Response(
            answer,
            status_code=201,
            media_type="application/sdp",
            headers={"Location": f"{CALLS_PATH}/{call.id}"},
        )

    async def hang_up(self, request: Request) -> Response:
        grant = self._check(request)
        if isinstance(grant, JSONResponse):
            return grant
        call_id = request.path_params["call_id"]
        call = self.calls.get(call_id)
        if call is None or not call.owned_by(grant):  # someone else's call: not even "exists"
            message = f"no call {quoted(call_id)} (it may have ended)"
            return openai_error(404, "call_not_found", message)
        await call.close("client_hung_up")
        return Response(status_code=204)

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        if call.session is not None:
            self.gateway.sessions.discard(call.session)
        self.gateway.release_slot()


def _reason(exc: BaseException) -> str:
    """aiortc's complaint, short: it may quote the offer."""
    return (str(exc) or type(exc).__name__)[:200]


def _unavailable(code: str, message: str) -> JSONResponse:
    response = openai_error(503, code, message)
    response.headers["Retry-After"] = "5"
    return response


def web_dir() -> Path:
    """The call page of this installation: package data if installed, else the source tree's."""
    packaged = resources.files("omni").joinpath("_data", "web")
    if packaged.is_dir():
        return Path(str(packaged))
    return _SOURCE_WEB


def add_webrtc_routes(app: FastAPI) -> None:
    """The call routes, and the call page at `/` (its files under /web/)."""
    calls = Calls(app.state.gateway)
    app.state.calls = calls
    app.add_api_route(f"{CALLS_PATH}/config", calls.config, methods=["GET"])
    app.add_api_route(CALLS_PATH, calls.create, methods=["POST"])
    app.add_api_route(f"{CALLS_PATH}/{{call_id}}", calls.hang_up, methods=["DELETE"])

    page = web_dir()

    async def index() -> FileResponse:
        return FileResponse(page / "index.html")

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.mount("/web", StaticFiles(directory=page), name="web")
