"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The tiny random-weight Qwen2.5-Omni checkpoint directory.

    Made once into the cache ($OMNI_CACHE, else ~/.cache/omni) and reused by later runs until
    its format version changes. Treat it as read-only.
    """
    from omni.checkpoints.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()
