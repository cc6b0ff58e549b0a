"""The HTTP/WebSocket app: /healthz, /v1/realtime, /v1/realtime/client_secrets, and the
/metrics listener beside it (omni/metrics.py says why it has a port of its own).

FastAPI on Starlette, served by uvicorn (its websockets-sansio protocol): the most used and
best kept ASGI stack, with first-class WebSockets, including the denial-response extension so
a bad key gets a plain HTTP 401 before any upgrade. Request bodies are checked with the same
pydantic models the WebSocket events use, and errors come back in OpenAI's `{"error": ...}`
shape. No framework code reaches the session logic, which stays transport-free.

The engine is either given ready-made (`create_app(settings, engine)`) or built by an
`engine_factory` (an async context manager) that the app enters at startup in the
background; /healthz answers 503 until it has yielded the engine, 200 after, and 503
"draining" again once a shutdown began (`Gateway.drain`), when new sessions and client
secrets are refused. /livez is 200 while the process can serve at all (503 only if the
engine failed to start), for a liveness probe that must not kill a pod that is loading or
draining.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from omni.checkpoints.family import QWEN2_5_OMNI
from omni.engine.api import Engine
from omni.gateway import realtime_ws, webrtc
from omni.gateway.auth import MAX_SECRET_SESSIONS, Denied, SecretTooLarge, bearer_token
from omni.gateway.http_limits import RequestLimits
from omni.engine.transcriber import Transcriber
from omni.gateway.state import (
    SHUTTING_DOWN,
    EngineFactory,
    Gateway,
    TranscriberFactory,
    openai_error,
)
from omni.session.client_events import SessionIn, validation_error
from omni.session.config import SessionConfig
from omni.session.errors import RealtimeError, new_id
from omni.settings import Settings


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(strict=True)

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(ge=10, le=7200)


class ClientSecretRequest(BaseModel):
    """POST /v1/realtime/client_secrets, as OpenAI takes it (strict types, as events), plus `max_sessions`: how many
    sessions the secret may open (on each replica; see auth.py)."""

    model_config = ConfigDict(strict=True)

    expires_after: ExpiresAfter | None = None
    session: SessionIn | None = None
    max_sessions: int = Field(1, ge=1, le=MAX_SECRET_SESSIONS)


class RefuseWhenDraining:
    """While draining, POSTs under /v1/realtime (WebRTC offers, client secrets for new calls)
    get a 503; hanging up and everything else still work while the open calls finish. Plain
    ASGI rather than BaseHTTPMiddleware: it never wraps the WebRTC offer handler in a task."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.gateway.draining
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith("/v1/realtime")
        ):
            self.gateway.metrics.connections_refused.labels("draining").inc()
            response = openai_error(
                503, SHUTTING_DOWN, "the server is shutting down; try again to reach another one"
            )
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    transcriber: Transcriber | None = None,
    transcriber_factory: TranscriberFactory | None = None,
    voices: tuple[str, ...] = QWEN2_5_OMNI.voices,
) -> FastAPI:
    """`transcriber` goes with `engine`, `transcriber_factory` with `engine_factory`; neither:
    input transcription is off. `voices`: the served checkpoint family's."""
    if (engine is None) == (engine_factory is None):
        raise ValueError("pass either an engine or an engine_factory")
    if (transcriber is not None and engine is None) or (
        transcriber_factory is not None and engine_factory is None
    ):
        raise ValueError("pass a transcriber with an engine, a transcriber_factory with a factory")
    gateway = Gateway(settings, engine, transcriber, voices)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        async with gateway.metrics.serving(settings.metrics_host, settings.metrics_port):
            task = (
                asyncio.create_task(gateway.run_engine(engine_factory, stop, transcriber_factory))
                if engine_factory
                else None
            )
            try:
                yield
            finally:
                stop.set()
                if task is not None:
                    if not gateway.ready.is_set():
                        task.cancel()  # still loading the model: stop the workers now
                    await asyncio.gather(task, return_exceptions=True)
                else:
                    await gateway.close_sessions()

    app = FastAPI(title="omni realtime", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(RefuseWhenDraining, gateway=gateway)
    app.add_middleware(RequestLimits, settings=settings)  # outermost: before any body is read

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if gateway.draining:
            return JSONResponse(
                {"status": "draining", "sessions": len(gateway.sessions)}, status_code=503
            )
        if gateway.engine is not None:
            return JSONResponse({"status": "ok", "sessions": len(gateway.sessions)})
        status = "failed" if gateway.engine_error else "loading"
        return JSONResponse({"status": status, "error": gateway.engine_error}, status_code=503)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        if gateway.engine_error:
            return JSONResponse({"status": "failed", "error": gateway.engine_error}, 503)
        return JSONResponse({"status": "alive"})

    @app.post("/v1/realtime/client_secrets")
    async def client_secrets(request: Request) -> JSONResponse:
        grant = gateway.keys.check(bearer_token(request.headers))
        if isinstance(grant, Denied) or not grant.static:
            why = grant.message if isinstance(grant, Denied) else "a client secret cannot mint"
            return openai_error(401, "invalid_api_key", f"{why}: an API key is required")
        try:
            body = ClientSecretRequest.model_validate_json(await request.body() or b"{}")
            session = body.session or SessionIn.model_validate({})
            # a session.update's checks, so a secret never carries a config that fails later
            config = SessionConfig.from_settings(settings, voices=voices).updated(session)
        except ValidationError as exc:
            error = validation_error(exc, "client_secrets")
            return openai_error(400, error.code, error.message, error.param)
        except RealtimeError as exc:
            return openai_error(400, exc.code, exc.message, exc.param)
        ttl = (
            body.expires_after.seconds if body.expires_after else settings.client_secret_ttl_seconds
        )
        try:
            secret = gateway.keys.mint(grant, ttl, body.max_sessions, session)
        except SecretTooLarge as exc:
            return openai_error(400, "client_secret_too_large", str(exc), "session")
        return JSONResponse(
            {
                "value": secret.value,
                "expires_at": secret.expires_at,
                "max_sessions": secret.max_sessions,
                "session": config.to_wire("ga", new_id("sess"), secret.expires_at),
            }
        )

    app.add_api_websocket_route("/v1/realtime", realtime_ws.realtime_endpoint)
    webrtc.add_webrtc_routes(app)
    return app
