"""The processor files of the tiny checkpoint, laid out as in Qwen2.5-Omni's own repository.

One `preprocessor_config.json` holds both the Whisper feature extractor (128 mel bins, 16 kHz,
n_fft 400, hop 160) and the Qwen2-VL image processor settings. Like the real repository there
is no `video_preprocessor_config.json`: transformers derives the video processor
(`Qwen2VLVideoProcessor`) from the same file, which needs torchvision (see processor.py).
Qwen3-Omni's repository has the same layout; its processor class, image patch (16) and
normalisation (0.5) differ, and so do its tokenizer's added tokens and its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from omni.checkpoints.chat_template import CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE
from omni.checkpoints.tokenizer import (
    QWEN3_ADDED_TOKENS,
    QWEN3_MODALITY_TOKENS,
    QWEN3_MODEL_MAX_LENGTH,
    build_tokenizer,
)

PREPROCESSOR_CONFIG = {
    "processor_class": "Qwen2_5OmniProcessor",
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "n_fft": 400,
    "hop_length": 160,
    "chunk_length": 300,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "dither": 0.0,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

QWEN3_PREPROCESSOR_CONFIG = PREPROCESSOR_CONFIG | {
    "processor_class": "Qwen3OmniMoeProcessor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
}


def write_processor_files(out_dir: Path) -> None:
    """Tokenizer, preprocessor config and chat template into `out_dir`."""
    build_tokenizer().save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_qwen3_processor_files(out_dir: Path) -> None:
    """Qwen3-Omni's tokenizer, preprocessor config and chat template into `out_dir`."""
    tokenizer = build_tokenizer(QWEN3_ADDED_TOKENS, QWEN3_MODALITY_TOKENS, QWEN3_MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(out_dir)
    config = json.dumps(QWEN3_PREPROCESSOR_CONFIG, indent=2)
    (out_dir / "preprocessor_config.json").write_text(config)
    (out_dir / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE)
