"""`omni bench engine --model tiny-qwen3-omni`: the engine's worker processes vs generate(),
one reply and `--sessions` (batched and unbatched), and `--in-process` (the Qwen3 streamer in
the bench's own process, what scripts/gpu-check runs at the real shapes).

Runs the real command on the tiny Qwen3-Omni checkpoint with short replies; its JSON has the
Qwen2.5 bench's keys (EngineBench; --sessions: the batching issue's keys).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from omni.bench.engine import EngineBench
from omni.cli import main
from test_bench_sessions import bench_env

ENGINE_KEYS = {field.name for field in dataclasses.fields(EngineBench)}
PATH_KEYS = {"first_text_ms", "first_audio_ms", "total_ms", "rtf"}


def _bench(checkpoint: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "omni.cli", "bench", "engine", "--model", str(checkpoint),
        "--codec-tokens", "10", "--text-tokens", "5", "--json", str(out), *flags,
    ]  # fmt: skip
    return subprocess.run(command, env=bench_env(), capture_output=True, text=True, timeout=300)


def test_engine_bench_matches_generate(tiny_qwen3_checkpoint: Path, tmp_path):
    out = tmp_path / "qwen3.json"
    done = _bench(tiny_qwen3_checkpoint, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == ENGINE_KEYS and result["matches_reference"] is True
    assert 0 < result["streaming"]["first_audio_ms"] < result["reference"]["first_audio_ms"]
    assert result["text_tokens"] == 5 and result["codec_tokens"] == 9  # generate() voices cap - 1
    assert "(Qwen3-Omni)" in done.stdout and "matches_reference: True" in done.stdout


def test_sessions_bench_batches_qwen3_and_matches_generate(tiny_qwen3_checkpoint: Path, tmp_path):
    out = tmp_path / "sessions.json"
    done = _bench(tiny_qwen3_checkpoint, out, "--sessions", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sessions"] == 2 and result["matches_reference"] is True
    for mode in ("batched", "unbatched"):
        assert set(result[mode]) >= {"codec_tokens_per_s", "first_audio_ms", "rtf_p95"}
        assert result[mode]["codec_tokens_per_s"] > 0


@pytest.mark.slow  # tests/test_gpu_check.py's tiny run runs the same command (its part 2)
def test_in_process_bench_matches_generate_and_streams_sooner(tiny_qwen3_checkpoint: Path, tmp_path):
    out = tmp_path / "qwen3.json"
    done = _bench(tiny_qwen3_checkpoint, out, "--in-process")
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


def test_in_process_with_sessions_is_refused_in_one_line(tiny_qwen3_checkpoint: Path, capsys):
    command = ["bench", "engine", "--model", str(tiny_qwen3_checkpoint), "--in-process", "--sessions", "2"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--in-process runs the Qwen3-Omni streamer" in err
    assert "Traceback" not in err
