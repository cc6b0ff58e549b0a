"""SIGTERM drains: `omni serve` (a real subprocess on the tiny checkpoint) keeps its port open,
says "draining" on /healthz, refuses new calls, lets the open call go on for the grace
period, then ends it with a `server_shutting_down` error and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

ROOT = Path(__file__).resolve().parents[1]
GRACE = 3.0
START_TIMEOUT = 180.0


class Server:
    """`omni serve` on port 0, its JSON log lines collected as they come."""

    def __init__(self, tiny_checkpoint: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_")}
        env.update(OMNI_CPU_THREADS="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "omni.cli",
                "serve",
                "--model",
                str(tiny_checkpoint),
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--log-format",
                "json",
                "--drain-grace-seconds",
                str(GRACE),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a failed test kills the workers too
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._port_known = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if match := re.search(r"metrics on http://127\.0\.0\.1:(\d+)", line):
                self.metrics_port = int(match.group(1))
            if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                self._port_known.set()

    def records(self) -> list[dict]:
        """The JSON log lines (the workers' own lines and library noise are not JSON)."""
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self._port_known.wait(START_TIMEOUT), "".join(self.lines[-20:])
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines[-20:])
            if httpx.get(f"{self.url}/healthz").status_code == 200:
                return
            time.sleep(0.5)
        raise AssertionError("the server did not become ready")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Server]:
    running = Server(tiny_checkpoint)
    try:
        running.wait_ready()
        yield running
    finally:
        if running.proc.poll() is None:
            os.killpg(running.proc.pid, signal.SIGKILL)
            running.proc.wait()


async def recv_json(ws: websockets.ClientConnection, timeout: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_sigterm_drains_calls_then_exits_0(server: Server) -> None:
    ws_url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    async with httpx.AsyncClient(base_url=server.url) as http:
        call = await websockets.connect(ws_url)
        created = await recv_json(call)
        assert created["type"] == "session.created"
        session_id = created["session"]["id"]

        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for _ in range(50):  # the drain starts on the server's next loop turn
            health = await http.get("/healthz")
            if health.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert health.status_code == 503
        assert health.json() == {"status": "draining", "sessions": 1}

        # new calls are refused, both ways in, with a reason a client can read
        async with websockets.connect(ws_url) as refused:
            error = await recv_json(refused)
            assert error["type"] == "error"
            assert error["error"]["code"] == "server_shutting_down"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await refused.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        offer = await http.post(
            "/v1/realtime/calls", content="v=0\r\n", headers={"content-type": "application/sdp"}
        )
        assert offer.status_code == 503
        assert offer.json()["error"]["code"] == "server_shutting_down"
        metrics = (await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics")).text
        assert "omni_draining 1.0" in metrics
        assert 'omni_connections_refused_total{reason="draining"} 2.0' in metrics
        assert "omni_engine_worker_restarts_total 0.0" in metrics

        # the open call still works during the grace period
        await call.send(json.dumps({"type": "session.update", "session": {"instructions": "hi"}}))
        assert (await recv_json(call))["type"] == "session.updated"

        # ...and is ended with a clear error once it is over
        ended = await recv_json(call, timeout=GRACE + 10)
        assert ended["type"] == "error"
        assert ended["error"]["code"] == "server_shutting_down"
        assert time.monotonic() - signalled >= GRACE - 0.5
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(call.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    assert await asyncio.to_thread(server.proc.wait, 60) == 0
    records = server.records()
    assert any(r.get("session_id") == session_id for r in records), "no log line names the call"
    assert any("draining" in r["message"] for r in records)
