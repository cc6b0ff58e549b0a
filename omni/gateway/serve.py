"""Run the service: bind safely, size the WebSocket limit, hand the app to uvicorn, drain
on SIGTERM.

`run_server` is what `omni serve` calls; `server_config` is shared with the tests, which run
the same uvicorn server in their own event loop on a free port.

Shutdown. uvicorn alone stops listening at once on SIGTERM, so a load balancer's health
check sees refused connections instead of a clear "draining", and open calls are cut. Here
the first SIGTERM (or Ctrl-C) starts `Gateway.drain`: the port stays open, /healthz says 503
"draining", new calls are refused, open calls get `drain_grace_seconds` to finish and are
then ended with a `server_shutting_down` error; only then is uvicorn told to exit, which
stops the engine. A second signal ends the open calls right away. The process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from omni.checkpoints.family import QWEN2_5_OMNI
from omni.gateway.app import create_app
from omni.gateway.http_limits import limited_protocols
from omni.gateway.state import EngineFactory, Gateway, TranscriberFactory
from omni.settings import LOOPBACK_HOST, Settings

log = logging.getLogger(__name__)


def bind_host(settings: Settings) -> str:
    """Without API keys anyone who can reach the port could use the model: loopback only."""
    if settings.auth_enabled:
        return settings.host
    if settings.host != LOOPBACK_HOST:
        log.warning(
            "no API keys configured (OMNI_API_KEYS): binding %s only, not %s",
            LOOPBACK_HOST,
            settings.host,
        )
    else:
        log.warning(
            "no API keys configured (OMNI_API_KEYS): auth is off, listening on %s only",
            LOOPBACK_HOST,
        )
    return LOOPBACK_HOST


def server_config(settings: Settings, app: object, **overrides: object) -> uvicorn.Config:
    # a message over max_message_bytes must still arrive whole, so the session can answer it
    # with an error event; past this hard ceiling the socket is closed (1009) instead
    ws_max_size = max(2 * settings.max_message_bytes, settings.max_message_bytes + (1 << 20))
    options: dict[str, object] = {
        "host": bind_host(settings),
        "port": settings.port,
        # h11 and websockets-sansio, extended with the request head's size and time limits
        **limited_protocols(settings),
        "ws_max_size": ws_max_size,
        "lifespan": "on",
        "log_config": None,  # omni.logs configures logging (text or JSON) for uvicorn too
        # after the drain every call is closed; this only bounds a connection that hangs on
        "timeout_graceful_shutdown": 10,
        **overrides,
    }
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above in place of its own signal handling."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, grace_seconds: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.grace_seconds = grace_seconds
        self.drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises the signal after a clean stop (exit 143, not 0),
        # and would stop listening before the drain; the loop's handlers run as plain callbacks
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: int) -> None:
        if self.drain_task is None:
            log.info("%s: shutting down", signal.Signals(sig).name)
            self.drain_task = asyncio.create_task(self._drain_then_exit())
        else:
            log.warning("%s again: ending the open calls now", signal.Signals(sig).name)
            self.gateway.hurry()

    async def _drain_then_exit(self) -> None:
        try:
            await self.gateway.drain(self.grace_seconds)
        finally:
            self.should_exit = True


def run_server(
    settings: Settings,
    engine_factory: EngineFactory,
    transcriber_factory: TranscriberFactory | None = None,
    voices: tuple[str, ...] = QWEN2_5_OMNI.voices,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain; /healthz turns 200 once `engine_factory` has
    yielded the engine (and `transcriber_factory`, if any, its transcriber). `voices`: the
    served checkpoint family's."""
    app = create_app(
        settings,
        engine_factory=engine_factory,
        transcriber_factory=transcriber_factory,
        voices=voices,
    )
    config = server_config(settings, app)
    DrainingServer(config, app.state.gateway, settings.drain_grace_seconds).run()
