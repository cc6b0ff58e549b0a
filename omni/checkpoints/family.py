"""The model families served (Qwen2.5-Omni, Qwen3-Omni): what tells them apart, in one place.

A checkpoint's family is its config.json `model_type`. Cheap to import (no torch): the
session layer reads the voices from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omni.checkpoints.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    name: str  # for messages: "Qwen2.5-Omni"
    model_type: str  # config.json's model_type
    voices: tuple[str, ...]  # the first is the default
    speakers_file: bool  # voices in spk_dict.pt (Qwen2.5) rather than in the talker config
    # speech per talker token: a Qwen2.5 code (one codebook) or a Qwen3 frame (16 codebooks)
    codec_token_ms: int
    codebooks: int  # codes per talker token, as the talker sends them on
    # the talker's sampling in transformers' generate() (temperature 0.9 in both)
    talker_top_k: int
    talker_top_p: float


QWEN2_5_OMNI = Family(
    "Qwen2.5-Omni",
    "qwen2_5_omni",
    ("Chelsie", "Ethan"),
    speakers_file=True,
    codec_token_ms=20,
    codebooks=1,
    talker_top_k=40,
    talker_top_p=0.8,
)
# the talker config's speaker_id names them in lower case; transformers' generate() defaults
# to Ethan
QWEN3_OMNI = Family(
    "Qwen3-Omni",
    "qwen3_omni_moe",
    ("Ethan", "Chelsie", "Aiden"),
    speakers_file=False,
    codec_token_ms=80,
    codebooks=16,
    talker_top_k=50,
    talker_top_p=1.0,
)
FAMILIES = {family.model_type: family for family in (QWEN2_5_OMNI, QWEN3_OMNI)}


def family_of_config(config: dict) -> Family:
    """The family a parsed config.json belongs to; CheckpointError for any other model."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        known = " or ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())
        raise CheckpointError(f"holds a {model_type!r} model, not {known}")
    return FAMILIES[model_type]


def family_of(path: Path) -> Family:
    """The family of the checkpoint directory `path`; CheckpointError if it is none."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        return family_of_config(json.loads(config.read_text()))
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
