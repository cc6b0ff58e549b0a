"""Fixtures that run the realtime tests against every registered engine.

`ENGINE_FACTORIES` maps a name to an engine factory (a zero-argument async context manager
yielding a loaded Engine, as `create_app(engine_factory=...)` takes). The `engine_factory`
fixture is parametrized over it, so registering the real engine on the tiny checkpoint here
runs every test body that uses `server` or `start_server` against it as well. Assertions
about reply content belong under `if isinstance(server.engine, FakeEngine)`.

Test modules load this as a plugin (`pytest_plugins = ["gateway_fixtures"]`), since
tests/conftest.py belongs to others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from fake_engine import fake_engine
from realtime_helpers import EngineFactory, RunningServer, running_server

ENGINE_FACTORIES: dict[str, EngineFactory] = {"fake": fake_engine}


@pytest.fixture(params=sorted(ENGINE_FACTORIES))
def engine_factory(request: pytest.FixtureRequest) -> EngineFactory:
    return ENGINE_FACTORIES[request.param]


@pytest.fixture
def start_server(
    engine_factory: EngineFactory,
) -> Callable[..., AbstractAsyncContextManager[RunningServer]]:
    """`async with start_server(max_sessions=1) as server:` for tests that need other settings."""
    return lambda **settings: running_server(engine_factory, **settings)


@pytest.fixture
async def server(
    start_server: Callable[..., AbstractAsyncContextManager[RunningServer]],
) -> AsyncIterator[RunningServer]:
    async with start_server() as running:
        yield running
