"""The tiny Qwen2.5-Omni configuration: real structure and token ids, tiny widths.

Kept from the real checkpoint because the streaming design depends on them: the thinker
vocabulary (152064, so every real token id is valid), all special ids (transformers' config
defaults are the real ones), 128 mel bins and 2-second audio windows (`n_window=100`), vision
patch 14 / merge 2 / temporal patch 2, the codec vocabulary (8448) and its specials, the DiT's
24-frame blocks, 2 mel frames per code, 8193 code embeddings, 80 mel bins and 192-dim
x-vectors, and BigVGAN's upsampling (hop 240 at 24 kHz). The DiT's look-ahead/look-back
layers are remapped from 22 layers to 4 keeping the receptive field (2 blocks back, 1 ahead).

Couplings: audio output_dim == vision out_hidden_size == thinker hidden == talker
embedding_size; mrope sections sum to head_dim / 2; BigVGAN's initial channels divide by
2 ** len(upsample_rates); DiT and BigVGAN share mel_dim.
"""

from __future__ import annotations

from transformers import Qwen2_5OmniConfig

THINKER_HIDDEN = 64
HEAD_DIM = 16
# the real checkpoint's split [16, 24, 24] of head_dim 128, scaled to head_dim 16
MROPE_SECTION = [2, 3, 3]
ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": MROPE_SECTION}


# Qwen2.5-Omni-7B's talker (per the notes: rtp-llm's test config of the real checkpoint), for
# timing real-size speech generation with random weights; the thinker stays tiny.
TALKER_7B = {
    "embedding_size": THINKER_HIDDEN,  # the thinker's hidden size (3584 in the real model)
    "hidden_size": 896,
    "intermediate_size": 18944,
    "num_hidden_layers": 24,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
}
SPEECH_VARIANTS = ("tiny", "7b")


def tiny_config(speech: str = "tiny") -> Qwen2_5OmniConfig:
    """The tiny config; speech="7b" swaps in the 7B's talker and Token2Wav sizes
    (transformers' DiT and BigVGAN defaults are the real ones)."""
    if speech not in SPEECH_VARIANTS:
        raise ValueError(f"unknown speech size {speech!r}; one of {SPEECH_VARIANTS}")
    text = {
        "vocab_size": 152064,
        "hidden_size": THINKER_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": THINKER_HIDDEN // HEAD_DIM,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_parameters": ROPE,
        # one shared embedding keeps the checkpoint small (152064 x 64 floats)
        "tie_word_embeddings": True,
        "pad_token_id": 151643,
        "eos_token_id": 151645,
    }
    audio = {
        "num_mel_bins": 128,
        "n_window": 100,
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "output_dim": THINKER_HIDDEN,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": THINKER_HIDDEN,
        "fullatt_block_indexes": [1],
    }
    talker = {
        "embedding_size": THINKER_HIDDEN,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 64 // HEAD_DIM,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "rope_parameters": ROPE,
    }
    dit = {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "head_dim": HEAD_DIM,
        "ff_mult": 2,
        "emb_dim": 32,
        "block_size": 24,
        "look_ahead_layers": [2],
        "look_backward_layers": [0, 3],
        "repeats": 2,
        "num_embeds": 8193,
        "mel_dim": 80,
        "enc_emb_dim": 192,
        "enc_dim": 32,
        "enc_channels": [32, 32, 32, 32, 96],
        "enc_attention_channels": 16,
        "enc_se_channels": 16,
    }
    bigvgan = {
        "mel_dim": 80,
        "upsample_initial_channel": 64,
        "upsample_rates": [5, 3, 2, 2, 2, 2],
        "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
        "resblock_kernel_sizes": [3, 7],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    }
    config = Qwen2_5OmniConfig(
        thinker_config={
            "text_config": text,
            "audio_config": audio,
            "vision_config": vision,
            "tie_word_embeddings": True,
            # not declared by Qwen2_5OmniThinkerConfig, but in the real config and read by
            # the thinker's get_rope_index
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "vision_token_id": 151654,
            "bos_token_id": 151644,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
        },
        talker_config=talker if speech == "tiny" else TALKER_7B,
        token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan} if speech == "tiny" else {},
    )
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    return config
