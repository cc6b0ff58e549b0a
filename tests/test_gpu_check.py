"""scripts/gpu-check: refuses clearly without CUDA; `--shape tiny` runs the whole check on CPU."""

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


def test_tiny_shape_runs_the_check_on_cpu(tmp_path):
    env = script_env(
        tmp_path, GPU_CHECK_SESSIONS="1 2", GPU_CHECK_CODEC_TOKENS="24", GPU_CHECK_TEXT_TOKENS="4"
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
