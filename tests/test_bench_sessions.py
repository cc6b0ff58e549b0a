"""`omni bench engine --sessions`: concurrent sessions, batched vs unbatched, vs generate().

Runs the real command (both engines' worker processes, then transformers' generate() for
each session's question) on the tiny checkpoint with short replies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni.bench.sessions import QUESTIONS, question
from omni.cli import build_parser
from bench_json import check_result


def bench_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_every_session_asks_its_own_question():
    asked = [question(i) for i in range(3 * len(QUESTIONS))]
    assert len(set(asked)) == len(asked)


def test_without_sessions_the_bench_is_the_single_turn_one():
    args = build_parser().parse_args(["bench", "engine"])
    assert args.sessions is None


# slow: tests/test_gpu_check.py's tiny run covers the same command (--sessions 1 2) by default
@pytest.mark.slow
def test_sessions_1_2_match_generate(tiny_checkpoint, tmp_path):
    out = tmp_path / "sessions.json"
    command = [
        sys.executable, "-m", "omni.cli", "bench", "engine", "--model", str(tiny_checkpoint),
        "--sessions", "1", "2", "--codec-tokens", "24", "--text-tokens", "4",
        "--vocoder-solver", "euler", "--stagger-s", "0.5", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=bench_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert isinstance(results, list) and len(results) == 2
    for result, sessions in zip(results, (1, 2)):
        check_result(result, sessions)
        assert result["staggered"]["stagger_s"] == 0.5
    assert "per-stage profile" in done.stdout
    assert "2 session(s); matches_reference: True" in done.stdout
