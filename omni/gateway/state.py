"""What every connection shares: settings, keys, metrics, the engine and the open sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi.responses import JSONResponse

from omni.engine.api import Engine
from omni.gateway.auth import KeyStore
from omni.metrics import Metrics
from omni.session.session import RealtimeSession
from omni.settings import Settings

log = logging.getLogger(__name__)

# builds and loads the engine on enter, shuts it down on exit
EngineFactory = Callable[[], AbstractAsyncContextManager[Engine]]


class Gateway:
    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.keys = KeyStore(settings.api_keys)
        self.engine = engine
        self.engine_error: str | None = None
        self.sessions: set[RealtimeSession] = set()
        self._slots = 0
        self.ready = asyncio.Event()
        if engine is not None:
            self.ready.set()

    def take_slot(self) -> bool:
        """Reserve room for one more session (no await between check and take)."""
        if self._slots >= self.settings.max_sessions:
            return False
        self._slots += 1
        return True

    def release_slot(self) -> None:
        self._slots -= 1

    async def run_engine(self, factory: EngineFactory, stop: asyncio.Event) -> None:
        """Enter the factory, serve with its engine until `stop`, then let it shut down."""
        try:
            async with factory() as engine:
                self.engine = engine
                self.ready.set()
                await stop.wait()
                await self.close_sessions()
                self.engine = None
        except Exception as exc:
            log.exception("the engine failed to start")
            self.engine_error = f"{type(exc).__name__}: {exc}"

    async def close_sessions(self) -> None:
        await asyncio.gather(*(session.close("server_shutdown") for session in list(self.sessions)))


def openai_error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    return JSONResponse({"error": error}, status_code=status)
