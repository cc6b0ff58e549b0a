"""Model presets: named checkpoints and the engine defaults that go with them.

The presets live in `models/presets.toml`; the wheel carries the same file as package data
(`omni/_data/presets.toml`), so both a source checkout and an installed package find them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from omni.checkpoints.tiny_cache import TINY_VARIANTS

_SOURCE_PRESETS = Path(__file__).resolve().parents[2] / "models" / "presets.toml"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    max_codec_tokens: int
    hub_id: str | None = None  # None: made locally (see `make`)
    make: str | None = None  # a tiny variant (TINY_VARIANTS): built locally, random weights

    @property
    def source(self) -> str:
        return self.hub_id if self.hub_id else f"made locally ({self.make})"


def presets_file() -> Path:
    """The presets file of this installation: package data if installed, else the source tree's."""
    packaged = resources.files("omni").joinpath("_data", "presets.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return _SOURCE_PRESETS


def load_presets(path: Path | None = None) -> dict[str, Preset]:
    """All presets by name, in file order."""
    with open(path or presets_file(), "rb") as f:
        table = tomllib.load(f)["presets"]
    presets = {}
    for name, entry in table.items():
        if ("hub_id" in entry) == ("make" in entry):
            raise ValueError(f"preset {name!r} needs exactly one of hub_id or make")
        if entry.get("make", "tiny") not in TINY_VARIANTS:
            raise ValueError(f"preset {name!r}: make is one of {', '.join(TINY_VARIANTS)}")
        presets[name] = Preset(name=name, **entry)
    return presets


def find_preset(spec: str) -> Preset | None:
    """The preset a model spec names, by preset name or by hub id."""
    presets = load_presets()
    if spec in presets:
        return presets[spec]
    return next((p for p in presets.values() if p.hub_id == spec), None)
