"""Making the tiny random-weight checkpoint (into the cache on demand).

The checkpoint is a complete Qwen2.5-Omni directory (config, sharded safetensors with an index,
spk_dict.pt, tokenizer, preprocessor config, chat template) that transformers loads exactly as
it loads the real one. It is deterministic: the same FORMAT_VERSION gives the same weights.
A marker file labels it as random weights wherever it is used.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.checkpoints.tiny_cache import (
    FORMAT_VERSION,
    MARKER_FILE,
    default_tiny_dir,
    is_tiny_checkpoint,
)
from omni.checkpoints.tiny_config import tiny_config
from omni.checkpoints.tiny_processor import write_processor_files
from omni.checkpoints.tiny_weights import shape_weights
from omni.checkpoints.tiny_whisper import write_tiny_whisper

log = logging.getLogger(__name__)

SEED = 20250326
# small shards so the tiny checkpoint is sharded with an index, like the real ones
SHARD_SIZE = "20MB"


VARIANTS = {"tiny": "tiny", "tiny-7b-speech": "7b"}  # variant -> speech size
WHISPER_VARIANT = "tiny-whisper"  # the transcriber's tiny Whisper (tiny_whisper.py)


def _write_checkpoint(out_dir: Path, variant: str) -> None:
    if variant == WHISPER_VARIANT:
        write_tiny_whisper(out_dir)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = Qwen2_5OmniForConditionalGeneration(tiny_config(VARIANTS[variant])).eval()
        speakers = shape_weights(model, SEED + 1)
        model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
        torch.save(speakers, out_dir / "spk_dict.pt")
        write_processor_files(out_dir)
    marker = {
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "seed": SEED,
        "weights": "random, not a real model",
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2))


def make_tiny_checkpoint(out_dir: Path, overwrite: bool = False, variant: str = "tiny") -> Path:
    """Write the tiny checkpoint to `out_dir` (built aside, then moved in whole).

    `overwrite` replaces an existing tiny checkpoint; other non-empty directories are refused.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not is_tiny_checkpoint(out_dir):
            raise FileExistsError(f"{out_dir} is not empty and not a tiny checkpoint")
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a tiny checkpoint")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        log.info("making the tiny random-weight checkpoint in %s", out_dir)
        _write_checkpoint(work, variant)
        if overwrite and is_tiny_checkpoint(out_dir):
            shutil.rmtree(out_dir)
        try:
            work.rename(out_dir)
        except OSError:
            # another process finished the same checkpoint first
            if not is_tiny_checkpoint(out_dir):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def ensure_tiny_checkpoint(path: Path | None = None, variant: str = "tiny") -> Path:
    """The tiny checkpoint at `path` (default: the cache), made first if it isn't there."""
    path = Path(path or default_tiny_dir(variant)).expanduser()
    if is_tiny_checkpoint(path):
        return path
    try:
        return make_tiny_checkpoint(path, variant=variant)
    except FileExistsError:
        if is_tiny_checkpoint(path):  # made meanwhile by another process
            return path
        raise
