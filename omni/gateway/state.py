"""What every connection shares: settings, keys, metrics, the engine and the open sessions;
and the drain that ends them on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

from fastapi.responses import JSONResponse

from omni.checkpoints.family import QWEN2_5_OMNI
from omni.engine.api import Engine
from omni.engine.transcriber import Transcriber
from omni.gateway.auth import Denied, KeyStore
from omni.metrics import Metrics
from omni.session import end_of_turn
from omni.session.errors import RealtimeError
from omni.session.session import RealtimeSession
from omni.session.vad import on_vad_threads
from omni.settings import Settings

log = logging.getLogger(__name__)

# builds and loads the engine on enter, shuts it down on exit
EngineFactory = Callable[[], AbstractAsyncContextManager[Engine]]
# starts the transcriber worker on enter (Whisper loaded), stops it on exit
TranscriberFactory = Callable[[], AbstractAsyncContextManager[Transcriber]]

# the error code (and close reason) of calls ended by a shutdown, and of calls refused during one
SHUTTING_DOWN = "server_shutting_down"


class Gateway:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None,
        transcriber: Transcriber | None = None,
        voices: tuple[str, ...] = QWEN2_5_OMNI.voices,
    ) -> None:
        self.settings = settings
        self.voices = voices  # the served checkpoint family's
        self.transcriber = transcriber  # None: input transcription is off
        self.metrics = Metrics()
        self.keys = KeyStore(settings.api_keys, settings.client_secret_key)
        self.engine = engine
        self.engine_error: str | None = None
        self.sessions: set[RealtimeSession] = set()
        self._slots = 0
        self.ready = asyncio.Event()
        if engine is not None:
            self.ready.set()
        self.draining = False
        self._hurry = asyncio.Event()  # a second signal: stop waiting for calls to finish
        self.metrics.watch_engine(lambda: self.engine)

    def take_slot(self) -> bool:
        """Reserve room for one more session (no await between check and take)."""
        if self._slots >= self.settings.max_sessions:
            return False
        self._slots += 1
        return True

    def release_slot(self) -> None:
        self._slots -= 1

    def refuse_key(self, denied: Denied) -> JSONResponse:
        """The 401 for a key that did not check out, counted."""
        self.metrics.connections_refused.labels("auth").inc()
        return openai_error(401, "invalid_api_key", denied.message)

    async def run_engine(
        self,
        factory: EngineFactory,
        stop: asyncio.Event,
        transcriber_factory: TranscriberFactory | None = None,
    ) -> None:
        """Enter the factories (the transcriber's first: it loads in seconds), serve with
        their engine and transcriber until `stop`, then let them shut down."""
        # while the model loads, so no caller's first semantic_vad pause pays for it
        warming = asyncio.ensure_future(on_vad_threads(end_of_turn.warm_up))
        try:
            async with AsyncExitStack() as running:
                if transcriber_factory is not None:
                    self.transcriber = await running.enter_async_context(transcriber_factory())
                self.engine = await running.enter_async_context(factory())
                await warming
                self.ready.set()
                await stop.wait()
                await self.close_sessions()
                self.engine = self.transcriber = None
        except Exception as exc:
            log.exception("the engine failed to start")
            self.engine_error = f"{type(exc).__name__}: {exc}"

    async def drain(self, grace_seconds: float) -> None:
        """Take no new calls (/healthz says "draining", so load balancers stop routing here),
        let the open ones go on for up to `grace_seconds`, then end the rest."""
        self.draining = True
        self.metrics.draining.set(1)
        log.info(
            "draining: refusing new calls; %d open, up to %g s to finish",
            len(self.sessions),
            grace_seconds,
        )
        waits = [asyncio.create_task(self._calls_ended()), asyncio.create_task(self._hurry.wait())]
        await asyncio.wait(waits, timeout=grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if self.sessions:
            log.warning("drain: ending %d calls still open", len(self.sessions))
        await self.close_sessions()

    def hurry(self) -> None:
        """End the drain's wait now (the open calls are ended right away)."""
        self._hurry.set()

    async def _calls_ended(self) -> None:
        # the sessions set is kept by the WebSocket and WebRTC endpoints; a shutdown can poll it
        while self.sessions:
            await asyncio.sleep(0.2)

    async def close_sessions(self) -> None:
        """End every open call with an error event saying why, so clients know to reconnect."""

        async def end(session: RealtimeSession) -> None:
            error = RealtimeError(
                SHUTTING_DOWN,
                "the server is shutting down; reconnect to continue on another one",
                type="server_error",
            )
            await session.emit_error(error)
            await session.close(SHUTTING_DOWN)

        await asyncio.gather(*(end(session) for session in list(self.sessions)))


def openai_error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    return JSONResponse({"error": error}, status_code=status)
