"""Random weights for the tiny Qwen3-Omni, shaped as the Qwen2.5 tiny's are (tiny_weights.py).

The same reasons apply: transformers' std 0.02 is far too small at width 64, so the thinker's
and talker's language models, the encoders, the code predictor and Code2Wav get
1/sqrt(fan_in), MoE experts included (their weights are fused (experts, out, in) tensors,
not nn.Linear); attention is sharpened (Qwen3 RMS-normalises queries and keys, so the gain
goes on those norms); placeholder tokens score 0 so a reply never holds one. Two differ:

- Codes: generate() already keeps the talker to the 2048 real codes and its eos. The codec
  head's rows for the specials (2048..3071, eos 2150 among them) are zero, so greedy and top-k
  always pick a real code and the tiny talker, like the Qwen2.5 tiny, never ends on its own.
- Voices: Qwen3-Omni's voices are codec ids in the talker config (`speaker_id`), rows of the
  talker's codec embedding; there is no spk_dict.pt.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Qwen3OmniMoeForConditionalGeneration

from omni.checkpoints.tiny_weights import (
    init_variance_preserving,
    sharpen_attention,
    silence_placeholders,
)

TARGET_RMS = 0.2  # of full scale, as for the Qwen2.5 tiny


@torch.no_grad()
def init_experts(module: nn.Module, generator: torch.Generator) -> None:
    """std 1/sqrt(fan_in) for the fused expert weights (gate_up_proj, down_proj) and routers."""
    for part in module.modules():
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(part, name, None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 3:
                weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[-1]), generator=generator)
        if type(part).__name__.endswith("TopKRouter"):
            part.weight.normal_(0.0, 1.0 / math.sqrt(part.weight.shape[-1]), generator=generator)


@torch.no_grad()
def restrict_codec_head(model: Qwen3OmniMoeForConditionalGeneration) -> None:
    """Zero the codec head's rows past the real codes (the specials, eos among them)."""
    head = model.talker.codec_head
    if head.weight.data_ptr() == model.talker.get_input_embeddings().weight.data_ptr():
        raise ValueError("the codec head is tied to the codec embedding: zeroing would mute voices")
    head.weight[model.config.code2wav_config.codebook_size :] = 0.0


@torch.no_grad()
def set_vocoder_loudness(
    model: Qwen3OmniMoeForConditionalGeneration, generator: torch.Generator
) -> None:
    """Scale Code2Wav's last convolution so random codes come out at TARGET_RMS."""
    code2wav = model.code2wav
    config = model.config.code2wav_config
    last = code2wav.decoder[-1].conv
    raw = []
    hook = last.register_forward_hook(lambda _m, _i, out: raw.append(out))
    shape = (1, config.num_quantizers, 25)
    codes = torch.randint(0, config.codebook_size, shape, generator=generator)
    code2wav(codes)
    hook.remove()
    last.weight *= TARGET_RMS / raw[0].pow(2).mean().sqrt()
    last.bias.zero_()


def shape_qwen3_weights(model: Qwen3OmniMoeForConditionalGeneration, seed: int) -> None:
    """Apply the shaping above in place."""
    generator = torch.Generator().manual_seed(seed)
    restrict_codec_head(model)
    init_variance_preserving(model.code2wav, generator)
    set_vocoder_loudness(model, generator)
    thinker, talker = model.thinker.model, model.talker
    for part in (
        thinker.language_model,
        thinker.audio_tower,
        thinker.visual,
        talker.model,
        talker.text_projection,
        talker.hidden_projection,
        talker.code_predictor.model,
    ):
        init_variance_preserving(part, generator)
        init_experts(part, generator)
    for language_model in (thinker.language_model, talker.model, talker.code_predictor.model):
        sharpen_attention(language_model)
    config = model.config.thinker_config
    silence_placeholders(
        model.thinker.get_input_embeddings(),
        [config.audio_token_id, config.image_token_id, config.video_token_id],
    )
