"""Resolving a `--model` spec to a local checkpoint directory and the defaults that go with it.

A spec is a preset name (`omni models list`), a checkpoint directory, a Hugging Face repo id,
or `auto`: the checkpoint named by $OMNI_MODEL, else a real preset already in the local HF
cache, else the tiny random-weight checkpoint (made on demand, with a loud warning). The
checkpoint's family (Qwen2.5-Omni or Qwen3-Omni) comes from its config.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.family import Family, family_of
from omni.checkpoints.hub import cached_snapshot, fetch_snapshot
from omni.checkpoints.presets import Preset, find_preset, load_presets
from omni.checkpoints.random_shapes import is_random_checkpoint
from omni.checkpoints.tiny_cache import is_tiny_checkpoint, tiny_variant

log = logging.getLogger(__name__)

ENV_MODEL = "OMNI_MODEL"
# transformers' talker_max_new_tokens, for checkpoints that match no preset
DEFAULT_MAX_CODEC_TOKENS = 4096
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # as given
    path: Path  # local checkpoint directory
    name: str  # preset name, hub id or directory, for logs and /healthz
    is_tiny: bool  # random weights: output is noise
    max_codec_tokens: int
    family: Family  # what the checkpoint is (its voices among the rest)


def check_checkpoint(path: Path, model_type: str, kind: str) -> None:
    """CheckpointError unless `path` holds a config of `model_type` (a `kind` model)."""
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    found = json.loads(config.read_text()).get("model_type")
    if found != model_type:
        raise CheckpointError(f"{path} holds a {found!r} model, not {kind}")


def _tiny_preset(variant: str | None = "tiny") -> Preset:
    """The preset that makes `variant`, else the Qwen2.5 tiny's (random-shapes checkpoints)."""
    presets = [p for p in load_presets().values() if p.make]
    qwen2_5_tiny = next(p for p in presets if p.make == "tiny")
    return next((p for p in presets if p.make == variant), qwen2_5_tiny)


def _resolved(spec: str, path: Path, name: str, preset: Preset | None) -> ResolvedModel:
    family = family_of(path)
    is_tiny = is_tiny_checkpoint(path) or is_random_checkpoint(path)
    if preset is None and is_tiny:
        preset = _tiny_preset(tiny_variant(path))
    limit = preset.max_codec_tokens if preset else DEFAULT_MAX_CODEC_TOKENS
    return ResolvedModel(
        spec=spec, path=path, name=name, is_tiny=is_tiny, max_codec_tokens=limit, family=family
    )


def _resolve_preset(spec: str, preset: Preset) -> ResolvedModel:
    if preset.make:
        # imported here: making it needs torch and transformers, resolving others doesn't
        from omni.checkpoints.tiny import ensure_tiny_checkpoint

        return _resolved(spec, ensure_tiny_checkpoint(variant=preset.make), preset.name, preset)
    return _resolved(spec, fetch_snapshot(preset.hub_id), preset.name, preset)


def _resolve_auto() -> ResolvedModel:
    configured = os.environ.get(ENV_MODEL, "").strip()
    if configured and configured != "auto":
        return resolve_model(configured)
    for preset in load_presets().values():
        if preset.hub_id and (path := cached_snapshot(preset.hub_id)) is not None:
            return _resolved("auto", path, preset.name, preset)
    tiny = _resolve_preset("auto", _tiny_preset())
    log.warning(
        "NO REAL MODEL: no Qwen-Omni checkpoint is configured ($%s) or in the Hugging Face "
        "cache, so the TINY RANDOM-WEIGHT model (%s) is used; its text is gibberish and its "
        "speech is noise",
        ENV_MODEL,
        tiny.path,
    )
    return tiny


def resolve_model(spec: str) -> ResolvedModel:
    """The checkpoint `spec` names, local or fetched; CheckpointError says what to do if not."""
    spec = spec.strip()
    if spec == "auto":
        return _resolve_auto()
    preset = find_preset(spec)
    if preset is not None:
        return _resolve_preset(spec, preset)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolved(spec, path.resolve(), spec, None)
    if HUB_ID.match(spec):
        return _resolved(spec, fetch_snapshot(spec), spec, None)
    names = ", ".join(load_presets())
    raise CheckpointError(
        f"{spec!r} is neither a preset ({names}), a checkpoint directory nor a Hugging Face repo id"
    )
