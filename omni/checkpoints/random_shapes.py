"""Checkpoints of random weights at a model's real shapes, the weights made on the device.

Timing the engine at Qwen2.5-Omni-7B's shapes needs no real weights, and a 16 GB download
or file is the slow part of getting them. A random-shapes checkpoint is a directory with the
7B's config.json, the tiny checkpoint's tokenizer, processor files and voices (the real token
ids), and a marker file; no tensors. The part loaders (parts.py), seeing the marker, build each
part from its config straight on the target device with a fixed seed, so the thinker and
talker processes and the bench's reference all get the same weights.

`--shape tiny` writes the tiny checkpoint's config instead, for CPU tests of the same path.

    python -m omni.checkpoints.random_shapes DIR [--shape 7b|tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2_5OmniConfig

from omni.checkpoints.tiny_config import TALKER_7B, tiny_config
from omni.checkpoints.tiny_processor import write_processor_files
from omni.checkpoints.tiny_weights import make_speakers, restrict_codec_head

MARKER_FILE = "omni_random_weights.json"
SEED = 20251203
SHAPES = ("7b", "tiny")
# each part its own stream of random numbers, so building one never shifts another's weights
PART_SEEDS = {"thinker.": 0, "talker.": 1, "token2wav.": 2}
# The thinker's token embeddings are drawn in blocks of rows, each from its own seed on the
# CPU: the talker process needs a few of its rows (speaker bos, text eos/pad) and makes just
# the block holding them, identical on any device, without building the thinker.
EMBEDDING_SEED = 1000
EMBEDDING_BLOCK_ROWS = 4096

THINKER_HIDDEN_7B = 3584
MROPE_7B = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}


# token ids the tiny config sets beyond transformers' defaults (the real checkpoint's)
THINKER_IDS = (
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
TEXT_IDS = ("pad_token_id", "eos_token_id")


def qwen_omni_7b_config() -> Qwen2_5OmniConfig:
    """Qwen2.5-Omni-7B's config: transformers' defaults are the 7B's except the values below
    (the real config.json's): the untied LM head, TMRoPE sections, the ViT's width and the
    talker's sizes; the token ids are the tiny config's. The DiT and BigVGAN defaults are
    the real ones."""
    tiny = tiny_config("tiny").thinker_config
    config = Qwen2_5OmniConfig(
        thinker_config={
            "text_config": {
                "rope_parameters": MROPE_7B,
                "tie_word_embeddings": False,
                "sliding_window": 32768,
                **{name: getattr(tiny.text_config, name) for name in TEXT_IDS},
            },
            "vision_config": {"hidden_size": 1280},
            "tie_word_embeddings": False,
            **{name: getattr(tiny, name) for name in THINKER_IDS},
        },
        talker_config={**TALKER_7B, "embedding_size": THINKER_HIDDEN_7B},
        token2wav_config={},
    )
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    return config


def shape_config(shape: str) -> Qwen2_5OmniConfig:
    if shape == "7b":
        return qwen_omni_7b_config()
    if shape == "tiny":
        return tiny_config("tiny")
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def is_random_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def random_seed(path: str | Path) -> int:
    """The seed the checkpoint's weights are built from."""
    return int(json.loads((Path(path) / MARKER_FILE).read_text())["seed"])


def build_random_part(
    cls: type[PreTrainedModel],
    config: Qwen2_5OmniConfig,
    checkpoint: str | Path,
    prefix: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """One part (`prefix` as in the weight names) built from its config directly on `device`,
    its weights initialised there by transformers from the checkpoint's fixed seed."""
    device = torch.device(device)
    seed = random_seed(checkpoint) + PART_SEEDS[prefix]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
    model.to(device)  # a no-op, but for any buffer __init__ made on the CPU regardless
    codec_head = getattr(model, "codec_head", None)
    if codec_head is not None:
        _restrict_codec_head(codec_head, seed)
    if prefix == "thinker.":
        _set_token_embeddings(model.get_input_embeddings().weight, config.text_config, checkpoint)
    return model


def _embedding_block(block: int, text_config, checkpoint: str | Path) -> torch.Tensor:
    """Rows [block * EMBEDDING_BLOCK_ROWS, ...) of the thinker's token embeddings (CPU, fp32),
    drawn as transformers initialises them (normal, std initializer_range)."""
    generator = torch.Generator().manual_seed(random_seed(checkpoint) + EMBEDDING_SEED + block)
    rows = torch.randn(EMBEDDING_BLOCK_ROWS, text_config.hidden_size, generator=generator)
    return rows * text_config.initializer_range


@torch.no_grad()
def _set_token_embeddings(weight: torch.Tensor, text_config, checkpoint: str | Path) -> None:
    vocab = weight.shape[0]
    for start in range(0, vocab, EMBEDDING_BLOCK_ROWS):
        rows = min(EMBEDDING_BLOCK_ROWS, vocab - start)
        block = _embedding_block(start // EMBEDDING_BLOCK_ROWS, text_config, checkpoint)
        weight[start : start + rows].copy_(block[:rows])


def random_embedding_rows(checkpoint: str | Path, ids: list[int]) -> torch.Tensor:
    """Rows `ids` of a random-shapes thinker's token embeddings, (len(ids), E) fp32 on the
    CPU, equal to what `build_random_part` puts in the thinker."""
    text = Qwen2_5OmniConfig.from_pretrained(checkpoint).thinker_config.text_config
    blocks = {i // EMBEDDING_BLOCK_ROWS for i in ids}
    made = {b: _embedding_block(b, text, checkpoint) for b in blocks}
    return torch.stack([made[i // EMBEDDING_BLOCK_ROWS][i % EMBEDDING_BLOCK_ROWS] for i in ids])


@torch.no_grad()
def _restrict_codec_head(head: nn.Linear, seed: int) -> None:
    """The tiny checkpoint's codec head shaping (only codes the vocoder can embed win), made
    on the CPU where its generator lives, then copied to the head's device and dtype."""
    shaped = nn.Linear(head.in_features, head.out_features, bias=False)
    restrict_codec_head(shaped, torch.Generator().manual_seed(seed))
    head.weight.copy_(shaped.weight)


def write_random_checkpoint(
    out_dir: str | Path, shape: str = "7b", overwrite: bool = False
) -> Path:
    """Write the config, processor files, voices and marker (a few MB, no weights)."""
    out_dir = Path(out_dir).expanduser().resolve()
    config = shape_config(shape)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not is_random_checkpoint(out_dir):
            raise FileExistsError(f"{out_dir} is not empty and not a random-shapes checkpoint")
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a random-shapes checkpoint")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    write_processor_files(out_dir)
    mel_dim = config.token2wav_config.dit_config.mel_dim
    speakers = make_speakers(torch.Generator().manual_seed(SEED), mel_dim)
    from omni.checkpoints.parts import SPEAKERS_FILE  # here: parts imports this module

    torch.save(speakers, out_dir / SPEAKERS_FILE)
    marker = {
        "shape": shape,
        "seed": SEED,
        "weights": "random, built on the device when loaded; not a real model",
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="directory to write (an old one is replaced)")
    parser.add_argument("--shape", default="7b", choices=SHAPES, help="model shapes (default 7b)")
    args = parser.parse_args(argv)
    print(write_random_checkpoint(args.dir, args.shape, overwrite=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
