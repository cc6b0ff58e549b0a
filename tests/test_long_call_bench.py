"""`omni bench long-call`: a simulated video call through the real engine's worker processes
on the tiny checkpoint, with a context budget small enough that a short call reaches it.

The bounds the issue sets are asserted (every turn answered, the context never above its
budget, the summary's keys), not times: the step-time and RSS ratios are the bench's to
report (README, "Long calls").
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_bench_sessions import bench_env

SUMMARY_KEYS = {
    "minutes",
    "turns",
    "turns_answered",
    "context_tokens_max",
    "context_budget",
    "step_ms_at_budget",
    "step_ms_last_minute",
    "rss_mb_at_budget",
    "rss_mb_last_minute",
}
ROW_KEYS = {"minute", "context_tokens", "kv_bytes", "step_ms", "first_audio_ms", "rss_mb"}


def long_call(tiny_checkpoint, tmp_path, minutes: int, *options: str) -> dict:
    out = tmp_path / "long_call.json"
    command = [
        sys.executable, "-m", "omni.cli", "bench", "long-call", "--model", str(tiny_checkpoint),
        "--minutes", str(minutes), "--json", str(out), *options,
    ]  # fmt: skip
    timeout = 300 + 60 * minutes
    done = subprocess.run(command, env=bench_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "context tok" in done.stdout  # the per-minute table
    return json.loads(out.read_text())


def check_call(result: dict, minutes: int, budget: int) -> dict:
    summary = result["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["minutes"] == minutes and summary["context_budget"] == budget
    assert summary["turns"] == minutes * 3 and summary["turns_answered"] == summary["turns"]
    assert summary["barge_ins"] == summary["turns"] // 3
    assert 0 < summary["context_tokens_max"] <= budget
    rows = result["per_minute"]
    assert [r["minute"] for r in rows] == list(range(1, minutes + 1))
    assert all(ROW_KEYS <= set(r) and r["context_tokens"] <= budget for r in rows)
    # frames at the model's 2 fps, stamped with up to 20 ms of capture jitter: each stood for
    # its own instant (taken in arrival order, or unstamped, the offset would not be this)
    assert 0 < summary["frame_audio_offset_ms_max"] <= 21
    return summary


def test_two_minute_call_stays_within_its_budget(tiny_checkpoint, tmp_path):
    result = long_call(tiny_checkpoint, tmp_path, 2, "--budget", "1000", "--max-context", "4096")
    summary = check_call(result, 2, 1000)
    assert summary["budget_reached_minute"] is not None and summary["budget_reached_minute"] < 2
    assert summary["step_ms_at_budget"] > 0 and summary["rss_mb_last_minute"] > 0


@pytest.mark.slow
def test_thirty_minute_call_at_the_default_budget(tiny_checkpoint, tmp_path):
    result = long_call(tiny_checkpoint, tmp_path, 30)
    summary = check_call(result, 30, 32768 - 1024)
    assert summary["budget_reached_minute"] is not None
