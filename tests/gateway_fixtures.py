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

from omni.engine.api import Engine

def tiny_engine() -> AbstractAsyncContextManager[Engine]:
    """The real engine: both worker processes on the tiny checkpoint."""
    from omni.checkpoints.tiny import ensure_tiny_checkpoint
    from omni.engine.engine import EngineConfig, running_engine

    return running_engine(EngineConfig(model_path=str(ensure_tiny_checkpoint()), max_codec_tokens=250))


ENGINE_FACTORIES: dict[str, EngineFactory] = {"fake": fake_engine, "tiny": tiny_engine}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test module against the engines it lists in `ENGINES` (default: the fake one;
    a real engine takes seconds to start, so the modules that matter end to end opt in)."""
    if "engine_factory" in metafunc.fixturenames:
        names = getattr(metafunc.module, "ENGINES", ("fake",))
        metafunc.parametrize("engine_factory", [ENGINE_FACTORIES[n] for n in names], ids=names)


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
