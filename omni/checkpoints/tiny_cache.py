"""Where the tiny checkpoint lives, and how to recognise one (cheap: no torch imports)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Bump whenever the tiny checkpoint's contents change, so caches rebuild.
FORMAT_VERSION = 2
MARKER_FILE = "omni_tiny.json"
# the tiny omni checkpoints tiny.py makes; a preset names one as `make`
TINY_VARIANTS = ("tiny", "tiny-7b-speech", "tiny-qwen3-omni")


def cache_dir() -> Path:
    """Where omni keeps what it makes: $OMNI_CACHE, else ~/.cache/omni."""
    return Path(os.environ.get("OMNI_CACHE") or Path.home() / ".cache" / "omni").expanduser()


def default_tiny_dir(variant: str = "tiny") -> Path:
    """variant: one of TINY_VARIANTS ("tiny-7b-speech": tiny thinker, the 7B's talker and
    Token2Wav sizes; "tiny-qwen3-omni": Qwen3-Omni)."""
    return cache_dir() / f"{variant}-v{FORMAT_VERSION}"


def is_tiny_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def tiny_variant(path: Path) -> str | None:
    """Which variant the tiny checkpoint at `path` is; None if it is not one."""
    if not is_tiny_checkpoint(path):
        return None
    return json.loads((Path(path) / MARKER_FILE).read_text()).get("variant")
