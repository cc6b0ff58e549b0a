"""Random weights shaped so the tiny model behaves usefully in tests.

Four properties random initialisation does not give:

- Its greedy replies must depend on the input. transformers initialises every weight at std
  0.02, about 1/sqrt(width) for the real model (width 3584) but an eighth of that at the tiny
  width 64: each layer then adds almost nothing to the residual stream, the thinker's last
  hidden state is its input token's embedding, and the tied lm_head picks that token again, so
  every prompt (all end in "assistant\\n") was answered "\\n\\n\\n...". The thinker's and the
  talker's language models, the audio and vision encoders and the thinker-to-talker projection
  get the std the real widths have, 1/sqrt(fan_in). That alone leaves attention nearly
  uniform (scores of std 1): every position averages the whole context, a long block of
  similar tokens (an audio clip, the system prompt) drowns the rest, and replies fall into a
  loop of one or two tokens. Trained models attend sharply; queries and keys scaled by QK_GAIN
  give scores of std 4, so each step attends to the few tokens its own content picks. Replies
  then vary with the text, audio and images, run past 60 tokens without an eos, and the
  talker's codes differ from the first code on when the thinker's reply differs.
- A reply must never hold a placeholder (<|AUDIO|>, <|IMAGE|>, <|VIDEO|>): in the next turn it
  would count as a slot for encoder features that don't exist, and generate() fails. Their
  rows of the tied embedding are zero, so they score 0 where thousands of tokens score above
  0; as inputs those rows are never used, the encoders' features replace them.
- Every code the talker picks must be one the vocoder can embed. The DiT embeds codes
  0..8192 only, so the codec head's rows for valid codes come in pairs (w, -w) and every other
  row (8193..8447, which includes eos 8294 and pad 8292) is zero. For any hidden state h one of
  each pair scores |w.h| > 0, so thousands of valid codes outscore every invalid one: greedy and
  top-k sampling (k < 4096) always pick a valid code, and the talker never ends on its own.
- Its speech must be clearly audible. With transformers' init BigVGAN's signal shrinks about
  10x per upsampling stage; its convolutions get the variance-preserving std too, and the last
  one is scaled so a reply comes out at a fixed loudness.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Qwen2_5OmniForConditionalGeneration

VOCODER_CODES = 8193  # the DiT's code embeddings: codes 0..8192
SPEAKERS = {"Chelsie": 151872, "Ethan": 151870}  # speaker -> its bos token in the thinker vocab
X_VECTOR_DIM = 192
REFERENCE_MEL_FRAMES = 400
TARGET_RMS = 0.2  # of full scale, before BigVGAN's clamp to [-1, 1]
QK_GAIN = 2.0  # on queries and keys: attention scores of std 4 instead of 1


def make_speakers(generator: torch.Generator, mel_dim: int = 80) -> dict[str, dict]:
    """spk_dict.pt contents: random x-vector `cond` and reference mel per voice."""
    return {
        name: {
            "bos_token": bos,
            "cond": torch.randn(1, X_VECTOR_DIM, generator=generator),
            "ref_mel": torch.randn(1, REFERENCE_MEL_FRAMES, mel_dim, generator=generator),
        }
        for name, bos in SPEAKERS.items()
    }


def _fan_in(module: nn.Module) -> float | None:
    """Inputs summed into each output value (per output sample for a transposed convolution)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.ConvTranspose1d):
        return module.in_channels * module.kernel_size[0] / module.stride[0]
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return module.weight[0].numel()
    return None


@torch.no_grad()
def init_variance_preserving(module: nn.Module, generator: torch.Generator) -> None:
    """std 1/sqrt(fan_in) for every linear and convolution weight in `module` (biases kept)."""
    for part in module.modules():
        if (fan_in := _fan_in(part)) is not None:
            part.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)


@torch.no_grad()
def sharpen_attention(language_model: nn.Module) -> None:
    """Scale every layer's queries and keys by QK_GAIN: their projections (biases are zero),
    or where queries and keys are RMS-normalised after projecting (Qwen3), those norms' gains."""
    for layer in language_model.layers:
        attention = layer.self_attn
        if hasattr(attention, "q_norm"):
            attention.q_norm.weight *= QK_GAIN
            attention.k_norm.weight *= QK_GAIN
        else:
            attention.q_proj.weight *= QK_GAIN
            attention.k_proj.weight *= QK_GAIN


@torch.no_grad()
def silence_placeholders(embedding: nn.Embedding, placeholders: list[int]) -> None:
    """Zero the tied embedding rows of the audio, image and video placeholder tokens."""
    embedding.weight[placeholders] = 0.0


@torch.no_grad()
def restrict_codec_head(head: nn.Linear, generator: torch.Generator) -> None:
    """Rows (w, -w) for valid codes, zero rows for codes the vocoder cannot take."""
    pairs = VOCODER_CODES // 2
    w = torch.randn(pairs, head.in_features, generator=generator) * 0.02
    head.weight.zero_()
    head.weight[0 : 2 * pairs : 2] = w
    head.weight[1 : 2 * pairs : 2] = -w


@torch.no_grad()
def set_vocoder_loudness(
    model: Qwen2_5OmniForConditionalGeneration, speaker: dict, generator: torch.Generator
) -> None:
    """Scale BigVGAN's output layer so random codes come out at TARGET_RMS."""
    vocoder = model.token2wav.code2wav_bigvgan_model
    raw = []
    hook = vocoder.conv_post.register_forward_hook(lambda _m, _i, out: raw.append(out))
    codes = torch.randint(0, VOCODER_CODES, (1, 100), generator=generator)
    noise_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    with torch.random.fork_rng():  # the DiT draws its start noise from the global generator
        torch.manual_seed(noise_seed)
        model.token2wav(codes, conditioning=speaker["cond"], reference_mel=speaker["ref_mel"])
    hook.remove()
    vocoder.conv_post.weight *= TARGET_RMS / raw[0].pow(2).mean().sqrt()


def shape_weights(model: Qwen2_5OmniForConditionalGeneration, seed: int) -> dict[str, dict]:
    """Apply the four properties in place; returns the speakers the loudness was set with."""
    generator = torch.Generator().manual_seed(seed)
    speakers = make_speakers(generator, model.config.token2wav_config.dit_config.mel_dim)
    restrict_codec_head(model.talker.codec_head, generator)
    init_variance_preserving(model.token2wav.code2wav_bigvgan_model, generator)
    set_vocoder_loudness(model, speakers["Chelsie"], generator)
    # drawn after the speech path, so reshaping the language models leaves its draws alone
    thinker, talker = model.thinker.model, model.talker
    for part in (thinker.language_model, thinker.audio_tower, thinker.visual, talker.model):
        init_variance_preserving(part, generator)
    init_variance_preserving(talker.thinker_to_talker_proj, generator)
    sharpen_attention(thinker.language_model)
    sharpen_attention(talker.model)
    thinker_config = model.config.thinker_config
    silence_placeholders(
        model.thinker.get_input_embeddings(),
        [
            thinker_config.audio_token_index,
            thinker_config.image_token_index,
            thinker_config.video_token_index,
        ],
    )
    return speakers
