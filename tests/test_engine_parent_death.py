"""A SIGKILLed front end leaves no workers behind (they would hold the model, and a GPU's
memory): real engine in a child process on the tiny checkpoint, killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

FRONT_END = """
import asyncio, json, sys
from omni.engine.engine import EngineConfig, OmniEngine

async def main():
    engine = OmniEngine(EngineConfig(sys.argv[1]))
    await engine.start()
    print(json.dumps([proc.pid for proc in engine._procs.values()]), flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


def test_workers_exit_when_the_front_end_is_killed(tiny_checkpoint: Path) -> None:
    assert_workers_die_with_their_front_end(FRONT_END, tiny_checkpoint, workers=3)


def assert_workers_die_with_their_front_end(script: str, checkpoint: Path, workers: int) -> None:
    """Run `script` (a front end that prints its workers' pids as a JSON list, then waits)
    on `checkpoint`, SIGKILL it, and check that every worker exits."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    front = subprocess.Popen(
        [sys.executable, "-c", script, str(checkpoint)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = front.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the front end exited early (code {front.wait()})"
        pids = json.loads(line)
        assert len(pids) == workers and not any(gone(pid) for pid in pids)
        front.send_signal(signal.SIGKILL)
        front.wait()
        deadline = time.monotonic() + 60  # generous: a busy machine, not a timing claim
        while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in pids), "workers outlived their front end"
    finally:
        front.kill()
        front.wait()
