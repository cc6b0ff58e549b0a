"""The transcriber's Whisper checkpoint: resolving `transcriber_model`, and loading it.

A spec is `auto` (the tiny random Whisper when the main model is tiny, else DEFAULT_REAL),
`tiny-whisper`, a Whisper checkpoint directory, a Hugging Face repo id (found in the HF cache
or downloaded into it, as the main model), or `none` (no transcriber). Real checkpoints load
through transformers' own `WhisperForConditionalGeneration` and `WhisperProcessor`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.hub import fetch_snapshot
from omni.checkpoints.loader import HUB_ID, check_checkpoint
from omni.checkpoints.weights import INDEX_FILE, SINGLE_FILE

TINY_WHISPER = "tiny-whisper"
OFF = frozenset({"none", "off"})
DEFAULT_REAL = "openai/whisper-small"
MODEL_TYPE = "whisper"
# what a Whisper repository needs here (they also carry TF, Flax and .bin copies of the weights)
HUB_FILES = ["*.json", "*.txt", "*.safetensors"]


@dataclass(frozen=True)
class ResolvedTranscriber:
    path: Path  # local checkpoint directory
    name: str  # tiny-whisper, a hub id or a directory, for logs
    is_tiny: bool  # random weights: transcripts are gibberish


def has_weights(path: Path) -> bool:
    index = path / INDEX_FILE
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((path / shard).is_file() for shard in shards)
    return (path / SINGLE_FILE).is_file()


def is_complete_whisper(path: Path) -> bool:
    return (path / "config.json").is_file() and has_weights(path)


def check_whisper(path: Path) -> None:
    """CheckpointError (one line, what to do) unless `path` is a loadable Whisper checkpoint."""
    check_checkpoint(path, MODEL_TYPE, "Whisper")
    if not has_weights(path):
        raise CheckpointError(
            f"{path} has no Whisper weights ({SINGLE_FILE} or a sharded index); download them "
            "(hf download openai/whisper-small --local-dir DIR), or set transcriber_model none"
        )


def resolve_transcriber(spec: str, main_is_tiny: bool) -> ResolvedTranscriber | None:
    """The Whisper checkpoint `spec` names (None: transcription off); CheckpointError if it
    cannot be had."""
    from omni.checkpoints.tiny import WHISPER_VARIANT, ensure_tiny_checkpoint

    spec = spec.strip()
    if spec.lower() in OFF:
        return None
    if spec == "auto":
        spec = TINY_WHISPER if main_is_tiny else DEFAULT_REAL
    if spec == TINY_WHISPER:
        return ResolvedTranscriber(ensure_tiny_checkpoint(variant=WHISPER_VARIANT), spec, True)
    path = Path(spec).expanduser()
    if path.is_dir():
        check_whisper(path.resolve())
        return ResolvedTranscriber(path.resolve(), spec, False)
    if HUB_ID.match(spec):
        path = fetch_snapshot(spec, is_complete_whisper, "Whisper", HUB_FILES)
        check_whisper(path)
        return ResolvedTranscriber(path, spec, False)
    raise CheckpointError(
        f"transcriber_model {spec!r} is neither auto, {TINY_WHISPER}, none, a Whisper "
        "checkpoint directory nor a Hugging Face repo id"
    )


def load_whisper(
    path: str | Path, device: str, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """(WhisperForConditionalGeneration, WhisperProcessor) from a checkpoint directory."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = Path(path)
    check_whisper(path)
    model = WhisperForConditionalGeneration.from_pretrained(
        path, dtype=dtype or "auto", device_map=device
    )
    return model.eval(), WhisperProcessor.from_pretrained(path)
