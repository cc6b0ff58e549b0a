"""`omni bench calls` on the scripted engine: one call, one turn, every column measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_engine import fake_engine
from realtime_helpers import API_KEY, running_server

from omni.bench import calls as bench


async def test_one_level_measures_latency_jitter_gaps_and_cpu() -> None:
    async with running_server(fake_engine) as server:
        url = f"http://127.0.0.1:{server.port}"
        # the server runs in this process: found by its port, as `omni bench calls` does
        pid = bench._listening_pid(server.port)
        assert pid == os.getpid()
        level = await bench.run_level(url, API_KEY, 1, 1, 16, 30.0, pid, server.metrics_url)
    assert (level.calls, level.turns, level.failed_turns, level.failed_calls) == (1, 1, 0, 0)
    assert level.p50_ms is not None and 0 < level.p50_ms < 5000
    assert level.jitter_p95_ms is not None and level.jitter_p95_ms < 100
    assert level.reply_audio_s > 0.2
    assert level.server_first_audio_ms is not None and level.server_first_audio_ms < level.p50_ms
    # the scripted engine runs faster than real time: few if any (a busy machine adds some)
    assert level.gap_frames is not None and level.gap_frames * 0.02 < level.reply_audio_s
    assert level.cpu_per_call_pct is not None and level.cpu_per_call_pct > 0
    assert "p50 ms" in bench.table([level])


def test_command_line_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    async def fake_level(*args: object) -> bench.LevelResult:
        seen["args"] = args
        return bench.LevelResult(
            calls=2,
            turns=4,
            failed_turns=0,
            failed_calls=0,
            p50_ms=900.0,
            p95_ms=1200.0,
            jitter_p95_ms=3.0,
            jitter_max_ms=9.0,
            server_first_audio_ms=400.0,
            reply_audio_s=8.0,
            gap_frames=0,
            cpu_per_call_pct=12.0,
            gateway_cpu_per_call_pct=4.0,
            load_average=0.5,
        )

    monkeypatch.setattr(bench, "run_level", fake_level)
    out = tmp_path / "calls.json"
    code = bench.main(
        ["calls", "--url", "http://10.0.0.1:9", "--calls", "2", "--turns", "2", "--json", str(out)]
    )
    assert code == 0
    assert seen["args"][2:6] == (2, 2, 16, 120.0)
    assert json.loads(out.read_text())[0]["p95_ms"] == 1200.0
