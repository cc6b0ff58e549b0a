"""Checkpoints of random weights at a model's real shapes, the weights made on the device.

Timing the engine at Qwen2.5-Omni-7B's shapes needs no real weights, and a 16 GB download
or file is the slow part of getting them. A random-shapes checkpoint is a directory with the
7B's config.json, the tiny checkpoint's tokenizer, processor files and voices (the real token
ids), and a marker file; no tensors. The part loaders (parts.py), seeing the marker, build each
part from its config straight on the target device with a fixed seed, so the thinker and
talker processes and the bench's reference all get the same weights.

`--shape tiny` writes the tiny checkpoint's config instead, for CPU tests of the same path.
`--shape qwen3-30b-a3b` (and `tiny-qwen3`) does the same for Qwen3-Omni-30B-A3B-Instruct: its
config.json, the tiny Qwen3 checkpoint's tokenizer and processor files (its voices are in the
config), the marker; its parts are the thinker, the talker (with the code predictor) and
Code2Wav. At the real shapes that is 35.3 B parameters, 70.5 GB in bfloat16: the thinker
process holds 31.7 B of them, so it fits one 80 GB or larger GPU (an H200 has 139 GB).
`--shape qwen3-30b-speech` is the tiny Qwen3 thinker with the 30B-A3B's talker, code predictor
and Code2Wav (3.5 B parameters, 14 GB in float32): the speech path at its real shapes, small
enough for a CPU with 24 GB.

    python -m omni.checkpoints.random_shapes DIR [--shape 7b|tiny|qwen3-30b-a3b|...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5OmniConfig,
    Qwen2_5OmniTalkerForConditionalGeneration,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeTalkerForConditionalGeneration,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerTextExperts,
)

from omni.checkpoints.family import FAMILIES
from omni.checkpoints.tiny_config import TALKER_7B, tiny_config
from omni.checkpoints.tiny_processor import write_processor_files, write_qwen3_processor_files
from omni.checkpoints.tiny_qwen3_config import tiny_qwen3_config
from omni.checkpoints.tiny_weights import make_speakers, restrict_codec_head

MARKER_FILE = "omni_random_weights.json"
SEED = 20251203
# each part its own stream of random numbers, so building one never shifts another's weights
PART_SEEDS = {"thinker.": 0, "talker.": 1, "token2wav.": 2, "code2wav.": 3}
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


# Qwen3-Omni-30B-A3B-Instruct's sizes. Source: its config.json on the Hugging Face Hub as
# printed by transformers 5.7 in the public model-inspection report tiny_qwen3_config.py cites
# (the same numbers as the report's module tree: e.g. q_proj 2048 -> 4096, 48 decoder layers).
# "default": transformers' Qwen3OmniMoe*Config default is the same number; "not default": the
# default differs (the thinker text defaults are not the 30B's), so only the report has it.
# The token ids, codec ids, voices, media and Code2Wav's causal settings are the tiny config's
# (the real ones, taken from it by name below).
QWEN3_THINKER_TEXT = {
    "vocab_size": 152064,  # not default (3584); tiny_qwen3_config: real
    "hidden_size": 2048,  # default
    "intermediate_size": 768,  # not default (18944); unused: every layer is MoE
    "moe_intermediate_size": 768,  # default
    "num_experts": 128,  # default; tiny_qwen3_config: real 128
    "num_experts_per_tok": 8,  # default; tiny_qwen3_config: real top 8
    "norm_topk_prob": True,  # default
    "decoder_sparse_step": 1,  # default
    "num_hidden_layers": 48,  # not default (28); tiny_qwen3_config: real 48
    "num_attention_heads": 32,  # not default (28)
    "num_key_value_heads": 4,  # default
    "head_dim": 128,  # not declared (hidden / heads would be 64); tiny: mrope of head_dim 128
    "max_position_embeddings": 65536,  # not default (32768)
    "rms_norm_eps": 1e-6,  # default
    "tie_word_embeddings": False,  # default
}
QWEN3_AUDIO = {  # AuT, ~650 M (the tech report): all default but output_dim
    "num_mel_bins": 128,
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "downsample_hidden_size": 480,
    "n_window": 50,
    "n_window_infer": 800,
    "conv_chunksize": 500,
    "max_source_positions": 1500,
    "output_dim": 2048,  # not default (3584): the thinker's hidden size
}
QWEN3_VISION = {  # SigLIP2-So400M, ~540 M: all default but out_hidden_size
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
    "out_hidden_size": 2048,  # not default (3584): the thinker's hidden size
}
QWEN3_TALKER_TEXT = {  # MoE 3B-A0.3B (the tech report)
    "vocab_size": 3072,  # default; tiny_qwen3_config: real
    "hidden_size": 1024,  # default
    "intermediate_size": 2048,  # default
    "moe_intermediate_size": 384,  # default
    "shared_expert_intermediate_size": 768,  # not declared by the config class
    "num_experts": 128,  # default
    "num_experts_per_tok": 6,  # not default (8); tiny_qwen3_config: real top 6
    "norm_topk_prob": True,  # not default (False)
    "num_hidden_layers": 20,  # default
    "num_attention_heads": 16,  # default
    "num_key_value_heads": 2,  # default
    "head_dim": 128,  # not declared (hidden / heads would be 64)
    "max_position_embeddings": 65536,  # not default (32768)
    "rms_norm_eps": 1e-6,  # default
}
QWEN3_CODE_PREDICTOR = {  # the MTP, ~80 M: all default but num_code_groups
    "vocab_size": 2048,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 5,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_code_groups": 16,  # not default (32); tiny_qwen3_config: real 16
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
}
QWEN3_CODE2WAV = {  # ~200 M: all default (its causal settings are the tiny config's, below)
    "codebook_size": 2048,
    "num_quantizers": 16,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "decoder_dim": 1536,
}
# interleaved mrope, split [24, 20, 20] of head_dim 128 (tiny_qwen3_config: real)
QWEN3_MROPE = {
    "rope_type": "default",
    "rope_theta": 1_000_000.0,
    "mrope_section": [24, 20, 20],
    "interleaved": True,
    "mrope_interleaved": True,
}
QWEN3_TALKER = {
    "num_code_groups": 16,  # not default (32)
    "thinker_hidden_size": 2048,  # default
    "accept_hidden_layer": 24,  # not default (18); tiny_qwen3_config: real 24 of 48
}
# what the tiny Qwen3 config carries beyond the sizes (all the real checkpoint's values)
QWEN3_THINKER_IDS = (
    "audio_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "user_token_id",
    "position_id_per_seconds",
    "seconds_per_chunk",
)
QWEN3_TALKER_IDS = QWEN3_THINKER_IDS[:6] + (
    "position_id_per_seconds",
    "seconds_per_chunk",
    "spatial_merge_size",
    "codec_pad_id",
    "codec_bos_id",
    "codec_eos_token_id",
    "codec_nothink_id",
    "codec_think_bos_id",
    "codec_think_eos_id",
    "speaker_id",
)
# Code2Wav's causal settings: sliding window 72, 1920 samples per frame (tiny_qwen3_config: real)
QWEN3_CODE2WAV_KEPT = (
    "sliding_window",
    "max_position_embeddings",
    "rms_norm_eps",
    "layer_scale_initial_scale",
    "rope_parameters",
    "upsample_rates",
    "upsampling_ratios",
)
QWEN3_IDS = (
    "im_start_token_id",
    "im_end_token_id",
    "tts_pad_token_id",
    "tts_bos_token_id",
    "tts_eos_token_id",
    "system_token_id",
    "user_token_id",
    "assistant_token_id",
)


def qwen3_omni_30b_config() -> Qwen3OmniMoeConfig:
    """Qwen3-Omni-30B-A3B-Instruct's config: the sizes above, the tiny config's ids and
    Code2Wav settings."""
    tiny = tiny_qwen3_config()
    thinker, talker = tiny.thinker_config, tiny.talker_config
    config = Qwen3OmniMoeConfig(
        thinker_config={
            "text_config": {**QWEN3_THINKER_TEXT, "rope_parameters": QWEN3_MROPE},
            "audio_config": QWEN3_AUDIO,
            "vision_config": QWEN3_VISION,
            "tie_word_embeddings": False,
            **{name: getattr(thinker, name) for name in QWEN3_THINKER_IDS},
        },
        talker_config={
            "text_config": {**QWEN3_TALKER_TEXT, "rope_parameters": QWEN3_MROPE},
            "code_predictor_config": QWEN3_CODE_PREDICTOR,
            **QWEN3_TALKER,
            **{name: getattr(talker, name) for name in QWEN3_TALKER_IDS},
        },
        code2wav_config={
            **QWEN3_CODE2WAV,
            **{name: getattr(tiny.code2wav_config, name) for name in QWEN3_CODE2WAV_KEPT},
        },
        enable_audio_output=True,
        **{name: getattr(tiny, name) for name in QWEN3_IDS},
    )
    config.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    return config


def qwen3_omni_30b_speech_config() -> Qwen3OmniMoeConfig:
    """The tiny Qwen3 config with the 30B-A3B's talker, code predictor and Code2Wav: the
    speech path at its real shapes (the talker reads the tiny thinker's width and layer)."""
    config, real = tiny_qwen3_config(), qwen3_omni_30b_config()
    thinker_side = config.talker_config
    config.talker_config, config.code2wav_config = real.talker_config, real.code2wav_config
    for name in ("thinker_hidden_size", "accept_hidden_layer"):
        setattr(config.talker_config, name, getattr(thinker_side, name))
    return config


# each shape's config; its model_type says the family (and so the files written with it)
SHAPE_CONFIGS = {
    "7b": qwen_omni_7b_config,
    "tiny": lambda: tiny_config("tiny"),
    "qwen3-30b-a3b": qwen3_omni_30b_config,
    "qwen3-30b-speech": qwen3_omni_30b_speech_config,
    "tiny-qwen3": tiny_qwen3_config,
}
SHAPES = tuple(SHAPE_CONFIGS)


def shape_config(shape: str) -> PreTrainedConfig:
    if shape not in SHAPE_CONFIGS:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    return SHAPE_CONFIGS[shape]()


def is_random_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def random_seed(path: str | Path) -> int:
    """The seed the checkpoint's weights are built from."""
    return int(json.loads((Path(path) / MARKER_FILE).read_text())["seed"])


def build_random_part(
    cls: type[PreTrainedModel],
    config: PreTrainedConfig,
    checkpoint: str | Path,
    prefix: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """One part (`prefix` as in the weight names) built from its config directly on `device`,
    its weights initialised there by transformers from the checkpoint's fixed seed."""
    seed = random_seed(checkpoint) + PART_SEEDS[prefix]
    with _seeded_on(device, seed):
        model = cls._from_config(config, dtype=dtype)
        if cls is Qwen3OmniMoeTalkerForConditionalGeneration:
            init_talker_experts(model)
    model.to(device)  # a no-op, but for any buffer __init__ made on the CPU regardless
    if cls is Qwen2_5OmniTalkerForConditionalGeneration:
        _restrict_codec_head(model.codec_head, seed)
    if prefix == "thinker.":
        _set_token_embeddings(model.get_input_embeddings().weight, config.text_config, checkpoint)
    return model


@contextmanager
def _seeded_on(device: str | torch.device, seed: int) -> Iterator[None]:
    """Tensors made inside go on `device` by default, drawn from `seed` (the caller's random
    state is left as it was)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            yield


@torch.no_grad()
def init_talker_experts(talker: nn.Module) -> None:
    """Draw the Qwen3-Omni talker's fused MoE expert weights, normal(0, initializer_range) from
    the current random state, as transformers draws every other weight. Built from a config,
    transformers leaves them torch.empty (whatever the allocator hands back: zeros in a fresh
    process, garbage or NaN later); the thinker's experts it does initialise."""
    for experts in talker.modules():
        if isinstance(experts, Qwen3OmniMoeTalkerTextExperts):
            std = talker.config.text_config.initializer_range
            experts.gate_up_proj.normal_(0.0, std)
            experts.down_proj.normal_(0.0, std)


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
    text = AutoConfig.from_pretrained(checkpoint).thinker_config.text_config  # either family
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
    """Write the config, processor files, voices (Qwen2.5's spk_dict.pt) and marker (a few MB,
    no weights)."""
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
    if FAMILIES[config.model_type].speakers_file:  # Qwen2.5-Omni
        write_processor_files(out_dir)
        mel_dim = config.token2wav_config.dit_config.mel_dim
        speakers = make_speakers(torch.Generator().manual_seed(SEED), mel_dim)
        from omni.checkpoints.parts import SPEAKERS_FILE  # here: parts imports this module

        torch.save(speakers, out_dir / SPEAKERS_FILE)
    else:  # Qwen3-Omni: its voices are codec ids in the talker config
        write_qwen3_processor_files(out_dir)
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
    parser.add_argument(
        "--shape", default="7b", choices=SHAPES, help="model shapes (default 7b)"
    )
    args = parser.parse_args(argv)
    print(write_random_checkpoint(args.dir, args.shape, overwrite=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
