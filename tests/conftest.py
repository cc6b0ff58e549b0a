"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

# The tests run the model in this process (the reference) beside the engine's two worker
# processes on a 2-core machine: one torch thread each keeps OpenMP threads from spinning
# against each other (which made small ops 100x slower).
os.environ.setdefault("OMNI_CPU_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a dependency
    pass


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The tiny random-weight Qwen2.5-Omni checkpoint directory.

    Made once into the cache ($OMNI_CACHE, else ~/.cache/omni) and reused by later runs until
    its format version changes. Treat it as read-only.
    """
    from omni.checkpoints.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_qwen3_checkpoint() -> Path:
    """The tiny random-weight Qwen3-Omni checkpoint directory (made and kept as the Qwen2.5
    one is). Treat it as read-only."""
    from omni.checkpoints.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(variant="tiny-qwen3-omni")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, so no real checkpoint on this machine is found."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache
