"""Run the service: bind safely, size the WebSocket limit, hand the app to uvicorn.

`run_server` is what `omni serve` calls; `server_config` is shared with the tests, which run
the same uvicorn server in their own event loop on a free port.
"""

from __future__ import annotations

import logging

import uvicorn

from omni.gateway.app import create_app
from omni.gateway.state import EngineFactory
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
        "ws": "websockets-sansio",
        "ws_max_size": ws_max_size,
        "lifespan": "on",
        **overrides,
    }
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


def run_server(settings: Settings, engine_factory: EngineFactory) -> None:
    """Serve until interrupted; /healthz turns 200 once `engine_factory` has yielded the engine."""
    app = create_app(settings, engine_factory=engine_factory)
    uvicorn.Server(server_config(settings, app)).run()
