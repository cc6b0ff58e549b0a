"""The tiny Qwen3-Omni configuration: the real Qwen3-Omni-30B-A3B-Instruct structure and token
ids, tiny widths and depths.

Source of the real values: Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json on the Hugging Face
Hub, as printed by transformers 5.7 in a public model-inspection report, cross-checked against
public config-parser test fixtures of the same checkpoint (speaker ids, codec ids, layer the
talker reads). This module is self-contained: it imports only transformers.

Kept from the real checkpoint: every special id (chat, tts, audio/vision placeholders, the
codec's pad/bos/eos/think ids and the three speakers), the thinker vocabulary (152064) and the
talker's codec vocabulary (3072: generate() suppresses its top 1024 ids but eos, so the codec's
specials and speaker ids must stay where they are), 16 codebooks of 2048 codes, 128 mel bins,
the audio window (n_window 50, n_window_infer 800), vision patch 16 / merge 2 / temporal 2 with
three deepstack layers, interleaved mrope with the real split [24, 20, 20] scaled to the tiny
head, 13 position ids per second, the MoE layout (top-k routing, normalised in the thinker;
a shared expert in the talker) with 4 tiny experts, and Code2Wav's causal settings (sliding
window 72, upsampling 8*5*4*3 after 2*2: 1920 samples per code at 24 kHz).
The thinker has 4 layers and the talker reads layer 2, the real checkpoint's proportion
(layer 24 of 48).

Couplings: audio output_dim == vision out_hidden_size == thinker hidden == talker
thinker_hidden_size; mrope sections sum to head_dim / 2; code predictor vocab == codebook size.
"""

from __future__ import annotations

from transformers import Qwen3OmniMoeConfig

THINKER_HIDDEN = 64
TALKER_HIDDEN = 64
HEAD_DIM = 16
THINKER_LAYERS = 4
ACCEPT_HIDDEN_LAYER = 2  # real: 24 of 48
# the real split [24, 20, 20] of head_dim 128 (half 64), scaled to head_dim 16 (half 8)
MROPE_SECTION = [4, 2, 2]
NUM_CODE_GROUPS = 16
CODEBOOK_SIZE = 2048
CODEC_VOCAB = 3072
# Qwen3-Omni's voices: speaker name (lower case, as generate() looks it up) -> codec id
SPEAKER_IDS = {"chelsie": 2301, "ethan": 2302, "aiden": 2303}

# special token ids of the real checkpoint
IM_START, IM_END = 151644, 151645
TTS_PAD, TTS_BOS, TTS_EOS = 151671, 151672, 151673
AUDIO_TOKEN, AUDIO_START, AUDIO_END = 151675, 151669, 151670
IMAGE_TOKEN, VIDEO_TOKEN = 151655, 151656
VISION_START, VISION_END = 151652, 151653
SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN = 8948, 872, 77091
POSITION_ID_PER_SECONDS = 13


def _mrope() -> dict:
    return {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": MROPE_SECTION,
        "interleaved": True,
        "mrope_interleaved": True,
    }


def tiny_qwen3_config() -> Qwen3OmniMoeConfig:
    """The tiny Qwen3-Omni config (random weights are made from it by the tiny checkpoint)."""
    text = {
        "vocab_size": 152064,
        "hidden_size": THINKER_HIDDEN,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "num_hidden_layers": THINKER_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6,
        "rope_parameters": _mrope(),
        # one shared embedding keeps the checkpoint small (152064 x 64 floats); real: untied
        "tie_word_embeddings": True,
    }
    audio = {
        "num_mel_bins": 128,
        "n_window": 50,
        "n_window_infer": 800,
        "conv_chunksize": 500,
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "downsample_hidden_size": 16,
        "max_source_positions": 1500,
        "output_dim": THINKER_HIDDEN,
    }
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [0, 1, 2],  # real: [8, 16, 24] of 27 blocks
        "out_hidden_size": THINKER_HIDDEN,
    }
    thinker = {
        "text_config": text,
        "audio_config": audio,
        "vision_config": vision,
        "audio_token_id": AUDIO_TOKEN,
        "audio_start_token_id": AUDIO_START,
        "audio_end_token_id": AUDIO_END,
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "user_token_id": USER_TOKEN,
        "position_id_per_seconds": POSITION_ID_PER_SECONDS,
        "seconds_per_chunk": 2,
        "tie_word_embeddings": True,
    }
    talker_text = {
        "vocab_size": CODEC_VOCAB,
        "hidden_size": TALKER_HIDDEN,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6,
        "rope_parameters": _mrope(),
    }
    code_predictor = {
        "vocab_size": CODEBOOK_SIZE,
        "hidden_size": TALKER_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "num_code_groups": NUM_CODE_GROUPS,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    }
    talker = {
        "text_config": talker_text,
        "code_predictor_config": code_predictor,
        "num_code_groups": NUM_CODE_GROUPS,
        "thinker_hidden_size": THINKER_HIDDEN,
        "accept_hidden_layer": ACCEPT_HIDDEN_LAYER,
        "codec_pad_id": 2148,
        "codec_bos_id": 2149,
        "codec_eos_token_id": 2150,
        "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157,
        "speaker_id": dict(SPEAKER_IDS),
        "audio_token_id": AUDIO_TOKEN,
        "audio_start_token_id": AUDIO_START,
        "audio_end_token_id": AUDIO_END,
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": VISION_START,
        "position_id_per_seconds": POSITION_ID_PER_SECONDS,
        "seconds_per_chunk": 2,
        # not declared by Qwen3OmniMoeTalkerConfig, but in the real config and read by the talker
        "spatial_merge_size": 2,
    }
    code2wav = {
        "codebook_size": CODEBOOK_SIZE,
        "num_quantizers": NUM_CODE_GROUPS,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "sliding_window": 72,
        "max_position_embeddings": 8000,
        "rms_norm_eps": 1e-5,
        "layer_scale_initial_scale": 0.01,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
        "decoder_dim": 64,
    }
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker,
        talker_config=talker,
        code2wav_config=code2wav,
        enable_audio_output=True,
        im_start_token_id=IM_START,
        im_end_token_id=IM_END,
        tts_pad_token_id=TTS_PAD,
        tts_bos_token_id=TTS_BOS,
        tts_eos_token_id=TTS_EOS,
        system_token_id=SYSTEM_TOKEN,
        user_token_id=USER_TOKEN,
        assistant_token_id=ASSISTANT_TOKEN,
    )
    config.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    return config
