"""Helpers for the realtime tests: a running server, WebSocket helpers and test media.

The fixtures that build servers from every registered engine are in gateway_fixtures.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pytest
import soundfile
import soxr
import uvicorn
import websockets
from openai import AsyncOpenAI
from PIL import Image

from omni.checkpoints.family import QWEN2_5_OMNI
from omni.engine.api import Engine
from omni.gateway.app import create_app
from omni.gateway.serve import server_config
from omni.gateway.state import Gateway, TranscriberFactory
from omni.settings import Settings

EngineFactory = Callable[[], AbstractAsyncContextManager[Engine]]
API_KEY = "test-key"
TIMEOUT = 60.0  # per event; the real engine on a busy 2-core machine is slow
ENGINE_START_TIMEOUT = 300.0  # the real engine loads the model in two processes


@dataclass
class RunningServer:
    gateway: Gateway
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=qwen2.5-omni"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics.port}/metrics"

    @property
    def engine(self) -> Engine:
        assert self.gateway.engine is not None
        return self.gateway.engine

    def client(self, api_key: str = API_KEY) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key=api_key)

    def ws(self, api_key: str | None = API_KEY, **kwargs: Any) -> websockets.connect:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return websockets.connect(self.ws_url, additional_headers=headers, **kwargs)


@asynccontextmanager
async def running_server(
    factory: EngineFactory,
    transcriber: TranscriberFactory | None = None,
    voices: tuple[str, ...] = QWEN2_5_OMNI.voices,
    **settings: Any,
) -> AsyncIterator[RunningServer]:
    """uvicorn in this event loop on a free loopback port, engine (and transcriber) loaded;
    `voices`: the served model family's."""
    settings.setdefault("api_keys", [API_KEY])
    settings.setdefault("metrics_port", 0)
    config = Settings(host="127.0.0.1", port=0, **settings)
    app = create_app(
        config, engine_factory=factory, transcriber_factory=transcriber, voices=voices
    )
    server = uvicorn.Server(server_config(config, app, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    gateway: Gateway = app.state.gateway
    await asyncio.wait_for(gateway.ready.wait(), ENGINE_START_TIMEOUT)
    try:
        yield RunningServer(gateway, server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await task


# -- raw WebSocket helpers


async def recv_event(ws: websockets.ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def recv_until(ws: websockets.ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the first of type `kind`."""
    events: list[dict[str, Any]] = []

    async def collect() -> list[dict[str, Any]]:
        while True:
            events.append(json.loads(await ws.recv()))
            if events[-1]["type"] == kind:
                return events

    return await asyncio.wait_for(collect(), TIMEOUT)


async def send_event(ws: websockets.ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


# -- media


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def silence(ms: int, rate: int = 24_000) -> bytes:
    return bytes(2 * rate * ms // 1000)


@lru_cache(maxsize=8)
def speech(text: str, rate: int = 24_000) -> bytes:
    """`text` spoken by espeak-ng, as pcm16 mono at `rate`."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    audio, source_rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return pcm16(soxr.resample(audio, source_rate, rate))


def words(text: str, rate: int = 24_000) -> bytes:
    """`speech(text)` without espeak-ng's trailing silence (for tests that place pauses)."""
    audio = np.frombuffer(speech(text, rate), dtype="<i2")
    return audio[: np.flatnonzero(np.abs(audio) > 327)[-1] + 1].tobytes()


def chunks(data: bytes, rate: int = 24_000, ms: int = 100) -> list[bytes]:
    size = 2 * rate * ms // 1000
    return [data[i : i + size] for i in range(0, len(data), size)]


def image_bytes(width: int = 64, height: int = 48, fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{b64(data)}"
