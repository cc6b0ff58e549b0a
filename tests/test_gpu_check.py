"""scripts/gpu-check: refuses clearly without CUDA; `--shape tiny` runs the whole check on CPU
(both parts: the Qwen2.5-Omni engine and the Qwen3-Omni streamer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_json import check_result

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"


def script_env(out: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMNI_PYTHON": sys.executable,
        "PYTHONPATH": str(SCRIPT.parents[1]),
        "OUT": str(out),
        **extra,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    done = subprocess.run(
        [str(SCRIPT)], env=script_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--shape tiny" in done.stderr
    assert not (tmp_path / "gpu-check.json").exists()
    assert not (tmp_path / "gpu-check-qwen3.json").exists()


def test_tiny_shape_runs_the_check_on_cpu(tmp_path):
    env = script_env(
        tmp_path,
        GPU_CHECK_SESSIONS="1 2",
        GPU_CHECK_CODEC_TOKENS="24",
        GPU_CHECK_TEXT_TOKENS="4",
        GPU_CHECK_QWEN3_FRAMES="6",
    )
    done = subprocess.run(
        [str(SCRIPT), "--shape", "tiny"], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [r["sessions"] for r in results] == [1, 2]
    for result, sessions in zip(results, (1, 2)):
        check_result(result, sessions)
        assert "omni-random-tiny" in result["model"]  # the random-shapes checkpoint it made
    assert "batched, together" in done.stdout and "per-stage profile" in done.stdout

    qwen3 = json.loads((tmp_path / "gpu-check-qwen3.json").read_text())
    keys = {"model", "text_tokens", "codec_tokens", "speech_seconds", "streaming", "reference"}
    assert keys | {"matches_reference", "family", "sessions"} <= set(qwen3)
    assert "omni-random-tiny-qwen3" in qwen3["model"] and qwen3["family"] == "Qwen3-Omni"
    assert qwen3["matches_reference"] is True, qwen3["mismatched"]  # float32 on the CPU
    assert qwen3["text_tokens"] == 4 and qwen3["codec_tokens"] == 5  # generate() voices 6 - 1
    assert qwen3["speech_seconds"] > 0 and qwen3["streaming"]["first_audio_ms"] > 0
    for part in ("Qwen2.5-Omni", "Qwen3-Omni"):
        assert f"gpu-check: {part} part: passed" in done.stdout


@pytest.mark.slow  # a second whole run of the script's Qwen3 part
def test_qwen3_part_runs_when_the_qwen25_part_fails(tmp_path):
    env = script_env(
        tmp_path, GPU_CHECK_SESSIONS="none", GPU_CHECK_QWEN3_FRAMES="3", GPU_CHECK_TEXT_TOKENS="2"
    )
    done = subprocess.run(
        [str(SCRIPT), "--shape", "tiny"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2  # the Qwen2.5 bench's (its --sessions refused)
    assert "gpu-check: Qwen2.5-Omni part: failed (exit code 2)" in done.stderr
    assert "gpu-check: Qwen3-Omni part: passed" in done.stdout
    assert not (tmp_path / "gpu-check.json").exists()
    assert json.loads((tmp_path / "gpu-check-qwen3.json").read_text())["matches_reference"]
