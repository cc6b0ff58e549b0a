"""Checkpoints from the Hugging Face Hub: found in the local HF cache, or downloaded into it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.family import FAMILIES
from omni.checkpoints.weights import INDEX_FILE, SINGLE_FILE


def is_complete(path: Path) -> bool:
    """Whether a checkpoint directory has the config of a served family, its speakers file
    (Qwen2.5-Omni's voices) and every weight file."""
    config = path / "config.json"
    if not config.is_file():
        return False
    family = FAMILIES.get(json.loads(config.read_text()).get("model_type"))
    if family is None or (family.speakers_file and not (path / "spk_dict.pt").is_file()):
        return False
    index = path / INDEX_FILE
    if not index.is_file():
        return (path / SINGLE_FILE).is_file()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((path / shard).is_file() for shard in shards)


def cached_snapshot(
    repo_id: str, complete: Callable[[Path], bool] = is_complete
) -> Path | None:
    """The complete local copy of `repo_id` in the HF cache, without touching the network."""
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        return None
    return path if complete(path) else None


def _why(error: OSError) -> str:
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository, or it needs a token"
    if isinstance(error, LocalEntryNotFoundError):
        return "no network?"
    return str(error).splitlines()[0]


def fetch_snapshot(
    repo_id: str,
    complete: Callable[[Path], bool] = is_complete,
    kind: str = "Qwen2.5-Omni or Qwen3-Omni",
    allow_patterns: list[str] | None = None,
) -> Path:
    """`repo_id` from the HF cache, downloading what is missing (only `allow_patterns`, if
    given); CheckpointError if impossible. `complete` says whether a copy is whole."""
    path = cached_snapshot(repo_id, complete)
    if path is not None:
        return path
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except OSError as error:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and could not be downloaded"
            f" ({_why(error)}). Download it on a machine with access"
            f" (hf download {repo_id} --local-dir DIR) and pass --model DIR"
        ) from None
    if not complete(path):
        raise CheckpointError(f"{repo_id} (in {path}) is not a complete {kind} checkpoint")
    return path
