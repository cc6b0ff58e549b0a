"""`omni bench engine --model tiny-qwen3-omni`: the Qwen3 streamer (in-process) vs generate().

Runs the real command on the tiny Qwen3-Omni checkpoint with short replies; its JSON has the
Qwen2.5 bench's keys (EngineBench). `--sessions` is refused in one line: there is no batched
Qwen3-Omni engine yet.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from omni.bench.engine import EngineBench
from omni.cli import main
from test_bench_sessions import bench_env

ENGINE_KEYS = {field.name for field in dataclasses.fields(EngineBench)}
PATH_KEYS = {"first_text_ms", "first_audio_ms", "total_ms", "rtf"}


def test_qwen3_bench_matches_generate_and_streams_sooner(tiny_qwen3_checkpoint: Path, tmp_path):
    out = tmp_path / "qwen3.json"
    command = [
        sys.executable, "-m", "omni.cli", "bench", "engine", "--model", str(tiny_qwen3_checkpoint),
        "--codec-tokens", "10", "--text-tokens", "5", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert ENGINE_KEYS == {
        "model", "text_tokens", "codec_tokens", "speech_seconds", "streaming", "reference",
        "matches_reference",
    }  # fmt: skip
    assert ENGINE_KEYS <= set(result)
    assert result["family"] == "Qwen3-Omni" and result["sessions"] == 1
    assert result["matches_reference"] is True
    assert set(result["streaming"]) == set(result["reference"]) == PATH_KEYS
    assert 0 < result["streaming"]["first_audio_ms"] < result["reference"]["first_audio_ms"]
    # the tiny talker never ends on its own: the caps decide (generate() voices cap - 1 frames)
    assert result["text_tokens"] == 5 and result["codec_tokens"] == 9
    assert result["speech_seconds"] > 0
    assert "in-process (not the engine's worker processes)" in done.stdout
    assert "matches_reference: True" in done.stdout


def test_qwen3_sessions_are_refused_in_one_line(tiny_qwen3_checkpoint: Path, capsys):
    assert main(["bench", "engine", "--model", str(tiny_qwen3_checkpoint), "--sessions", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batched Qwen3-Omni engine is not built yet" in err
    assert "Traceback" not in err
