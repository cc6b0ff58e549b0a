"""Reading one part of a checkpoint's safetensors weights (thinker., talker., token2wav.).

A process that runs only the talker should not read the thinker's gigabytes: the index tells
which shard holds which tensor, so only the shards holding the part are opened, and only the
part's tensors are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(checkpoint: Path) -> dict[str, str]:
    """Tensor name -> shard file name, for sharded and single-file checkpoints alike."""
    checkpoint = Path(checkpoint)
    index = checkpoint / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(checkpoint / SINGLE_FILE, framework="pt") as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def read_part(
    checkpoint: Path, prefix: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors named `prefix` + name, keyed by name, read straight onto `device`."""
    checkpoint = Path(checkpoint)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map(checkpoint).items():
        if name.startswith(prefix):
            by_shard.setdefault(shard, []).append(name)
    if not by_shard:
        raise KeyError(f"no tensors starting with {prefix!r} in {checkpoint}")
    tensors = {}
    for shard, names in by_shard.items():
        with safe_open(checkpoint / shard, framework="pt", device=str(device)) as f:
            for name in names:
                tensors[name[len(prefix) :]] = f.get_tensor(name)
    return tensors
