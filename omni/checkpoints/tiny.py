"""Making the tiny random-weight checkpoint (into the cache on demand).

The checkpoint is a complete Qwen2.5-Omni directory (config, sharded safetensors with an index,
spk_dict.pt, tokenizer, preprocessor config, chat template) that transformers loads exactly as
it loads the real one; the "tiny-qwen3-omni" variant is the same for Qwen3-Omni (whose voices
are in its config, so it has no spk_dict.pt). It is deterministic: the same FORMAT_VERSION
gives the same weights.
A marker file labels it as random weights wherever it is used.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2_5OmniForConditionalGeneration, Qwen3OmniMoeForConditionalGeneration

from omni.checkpoints.tiny_cache import (
    FORMAT_VERSION,
    MARKER_FILE,
    default_tiny_dir,
    is_tiny_checkpoint,
)
from omni.checkpoints.tiny_config import tiny_config
from omni.checkpoints.tiny_processor import write_processor_files, write_qwen3_processor_files
from omni.checkpoints.tiny_qwen3_config import tiny_qwen3_config
from omni.checkpoints.tiny_qwen3_weights import shape_qwen3_weights
from omni.checkpoints.tiny_weights import shape_weights
from omni.checkpoints.tiny_whisper import write_tiny_whisper

log = logging.getLogger(__name__)

SEED = 20250326
# small shards so the tiny checkpoint is sharded with an index, like the real ones
SHARD_SIZE = "20MB"


VARIANTS = {"tiny": "tiny", "tiny-7b-speech": "7b"}  # Qwen2.5-Omni variant -> speech size
QWEN3_VARIANT = "tiny-qwen3-omni"
WHISPER_VARIANT = "tiny-whisper"  # the transcriber's tiny Whisper (tiny_whisper.py)


def _write_qwen3_checkpoint(out_dir: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_config()).eval()
    shape_qwen3_weights(model, SEED + 1)
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    write_qwen3_processor_files(out_dir)


def _write_checkpoint(out_dir: Path, variant: str) -> None:
    if variant == WHISPER_VARIANT:
        write_tiny_whisper(out_dir)
    elif variant == QWEN3_VARIANT:
        _write_qwen3_checkpoint(out_dir)
    elif variant in VARIANTS:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = Qwen2_5OmniForConditionalGeneration(tiny_config(VARIANTS[variant])).eval()
        speakers = shape_weights(model, SEED + 1)
        model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
        torch.save(speakers, out_dir / "spk_dict.pt")
        write_processor_files(out_dir)
    else:
        raise ValueError(f"unknown tiny variant {variant!r}")
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
