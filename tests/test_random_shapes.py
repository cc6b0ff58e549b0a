"""Random weights at real shapes, built on the device (omni/checkpoints/random_shapes.py).

The 7B config is checked on the meta device (its parameter count is the published 10.7 B);
the loaders and the engine are run on CPU at the tiny shapes (`--shape tiny`): each part is
built from the checkpoint's seed in each process, so the workers and the reference agree.
The Qwen3-Omni-30B-A3B and `qwen3-30b-speech` configs are checked on the meta device too, its
loaders and the engine through the worker processes at `tiny-qwen3`.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import (
    Qwen2_5OmniForConditionalGeneration,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
)

from omni.bench.reference import ReferenceConversation
from omni.checkpoints.loader import resolve_model
from omni.checkpoints.parts import (
    load_code2wav,
    load_talker,
    load_talker_lm,
    load_thinker,
    load_thinker_embedding_rows,
    load_whole,
)
from omni.checkpoints.processor import load_processor
from omni.checkpoints.random_shapes import (
    MARKER_FILE,
    is_random_checkpoint,
    qwen3_omni_30b_config,
    qwen_omni_7b_config,
    write_random_checkpoint,
)
from omni.checkpoints.tiny_qwen3_config import tiny_qwen3_config
from omni.checkpoints.tiny_weights import SPEAKERS, VOCODER_CODES
from omni.engine.api import (
    SAMPLES_PER_CODE,
    AudioChunk,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
)
from omni.engine.engine import EngineConfig, running_engine

LENGTHS = dict(max_text_tokens=4, min_text_tokens=4, max_codec_tokens=24, min_codec_tokens=24)


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "tiny", shape="tiny")


def test_7b_config_has_the_real_shapes():
    config = qwen_omni_7b_config()
    text = config.thinker_config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (3584, 28, 18944)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.thinker_config.vision_config.hidden_size == 1280
    talker = config.talker_config
    assert (talker.hidden_size, talker.num_hidden_layers, talker.embedding_size) == (896, 24, 3584)
    with torch.device("meta"):
        model = Qwen2_5OmniForConditionalGeneration._from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert 10.6e9 < params < 10.9e9  # Qwen2.5-Omni-7B: 10.7 B parameters in all


def test_qwen3_30b_config_has_the_real_shapes(tmp_path):
    path = write_random_checkpoint(tmp_path / "30b", shape="qwen3-30b-a3b")
    config = Qwen3OmniMoeConfig.from_pretrained(path)  # as written, no weights
    assert config.to_dict() == qwen3_omni_30b_config().to_dict()
    text = config.thinker_config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (2048, 48, 152064)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 4, 128)
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (128, 8, 768)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and not text.tie_word_embeddings
    audio, vision = config.thinker_config.audio_config, config.thinker_config.vision_config
    assert (audio.d_model, audio.encoder_layers, audio.output_dim) == (1280, 32, 2048)
    assert (vision.hidden_size, vision.depth, vision.out_hidden_size) == (1152, 27, 2048)
    talker = config.talker_config
    assert (talker.accept_hidden_layer, talker.num_code_groups, talker.thinker_hidden_size) == (
        24,
        16,
        2048,
    )
    talker_text = talker.text_config
    assert (talker_text.hidden_size, talker_text.num_hidden_layers) == (1024, 20)
    assert (talker_text.num_experts, talker_text.num_experts_per_tok) == (128, 6)
    assert (talker_text.moe_intermediate_size, talker_text.shared_expert_intermediate_size) == (
        384,
        768,
    )
    predictor, code2wav = talker.code_predictor_config, config.code2wav_config
    assert (predictor.hidden_size, predictor.num_hidden_layers, predictor.vocab_size) == (
        1024,
        5,
        2048,
    )
    assert (code2wav.hidden_size, code2wav.num_hidden_layers, code2wav.decoder_dim) == (
        1024,
        8,
        1536,
    )
    assert talker.speaker_id == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert (talker.codec_eos_token_id, config.tts_bos_token_id) == (2150, 151672)
    with torch.device("meta"):  # shapes only: 70 GB in bfloat16
        model = Qwen3OmniMoeForConditionalGeneration._from_config(config)
    def params(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert 35.2e9 < params(model) < 35.3e9  # thinker 31.7 B, talker 3.3 B, Code2Wav 0.2 B
    thinker = model.thinker
    language_model = params(thinker.model.language_model) + params(thinker.lm_head)
    assert 30.5e9 < language_model < 30.6e9  # "30B-A3B": 30.5 B
    # the tech report's encoders: AuT 650 M, SigLIP2-So400M 540 M
    assert 0.64e9 < params(thinker.model.audio_tower) < 0.66e9
    assert 0.53e9 < params(thinker.model.visual) < 0.55e9


def test_qwen3_30b_speech_shape_is_the_tiny_thinker_with_the_real_speech_path(tmp_path):
    path = write_random_checkpoint(tmp_path / "speech", shape="qwen3-30b-speech")
    config = Qwen3OmniMoeConfig.from_pretrained(path)
    real, tiny = qwen3_omni_30b_config(), tiny_qwen3_config()
    assert config.thinker_config.to_dict() == tiny.thinker_config.to_dict()
    assert config.code2wav_config.to_dict() == real.code2wav_config.to_dict()
    talker, real_talker = config.talker_config.to_dict(), real.talker_config.to_dict()
    thinker_side = {"thinker_hidden_size", "accept_hidden_layer"}
    assert {k: v for k, v in talker.items() if k not in thinker_side} == {
        k: v for k, v in real_talker.items() if k not in thinker_side
    }
    text = config.thinker_config.text_config
    assert config.talker_config.thinker_hidden_size == text.hidden_size
    assert config.talker_config.accept_hidden_layer < text.num_hidden_layers
    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert 3.5e9 < params < 3.6e9  # talker 3.32 B (code predictor 0.14 B), Code2Wav 0.22 B


@pytest.fixture(scope="module")
def random_qwen3(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "qwen3", shape="tiny-qwen3")


def test_random_qwen3_checkpoint_loads_the_same_weights_every_time(random_qwen3):
    path = random_qwen3
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "tokenizer.json", "preprocessor_config.json", MARKER_FILE} <= names
    assert "spk_dict.pt" not in names and not any(n.endswith(".safetensors") for n in names)
    assert resolve_model(str(path)).family.name == "Qwen3-Omni"
    first = load_whole(path, "cpu", torch.float32)
    assert isinstance(first, Qwen3OmniMoeForConditionalGeneration) and not first.training
    weights = first.state_dict()
    again = load_whole(path, "cpu", torch.float32).state_dict()
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not any(w.is_meta for w in weights.values())  # every part of the shell replaced
    experts = first.talker.model.layers[0].mlp.experts
    assert 0.01 < float(experts.gate_up_proj.std()) < 0.03  # drawn, not left torch.empty
    # the whole is the parts each worker builds alone
    parts = {
        "thinker.": load_thinker(path, "cpu", torch.float32).model,
        "talker.": load_talker_lm(path, "cpu", torch.float32),
        "code2wav.": load_code2wav(path, "cpu", torch.float32),
    }
    for prefix, part in parts.items():
        for name, tensor in part.state_dict().items():
            assert torch.equal(weights[prefix + name], tensor), prefix + name
    text = first.config.thinker_config.text_config
    ids = [first.config.tts_bos_token_id, first.config.tts_pad_token_id, text.vocab_size - 1]
    rows = load_thinker_embedding_rows(path, ids, "cpu", torch.float32)
    assert torch.equal(rows, first.thinker.get_input_embeddings().weight[ids])
    assert load_whole(path, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_random_qwen3_engine_replies_as_generate_does(random_qwen3):
    """Through the worker processes, each building its part from the config."""
    frames = 12

    async def reply() -> tuple[ReplyDone, int]:
        async with running_engine(EngineConfig(model_path=str(random_qwen3))) as engine:
            await engine.open_session("s", SessionOptions())
            await engine.add_text("s", "Hello there, random model!")
            options = ReplyOptions(greedy=True, max_text_tokens=4, max_codec_tokens=frames)
            events = [e async for e in engine.respond("s", options)]
        samples = sum(e.pcm.size for e in events if isinstance(e, AudioChunk))
        return events[-1], samples

    done, samples = asyncio.run(reply())
    assert done.status == "completed", done.error
    reference = ReferenceConversation(load_whole(random_qwen3), load_processor(random_qwen3))
    reference.user_turn(text="Hello there, random model!")
    expected = reference.generate("Ethan", max_text_tokens=4, max_codec_tokens=frames)
    assert done.text_token_ids == expected.text_ids
    assert done.codec_tokens == expected.codes and len(expected.codes) > 4 * 16
    assert samples == done.audio_samples == expected.wav.size


def test_checkpoint_is_a_config_and_no_weights(random_tiny, tmp_path):
    names = {p.name for p in random_tiny.iterdir()}
    assert {"config.json", "spk_dict.pt", "preprocessor_config.json", MARKER_FILE} <= names
    assert not any(name.endswith(".safetensors") for name in names)
    assert json.loads((random_tiny / MARKER_FILE).read_text())["shape"] == "tiny"
    assert is_random_checkpoint(random_tiny)
    assert resolve_model(str(random_tiny)).path == random_tiny
    with pytest.raises(FileExistsError):
        write_random_checkpoint(random_tiny, shape="tiny")  # no overwrite asked
    (tmp_path / "other").write_text("not a checkpoint")
    with pytest.raises(FileExistsError):
        write_random_checkpoint(tmp_path, shape="tiny", overwrite=True)
    with pytest.raises(ValueError):
        write_random_checkpoint(tmp_path / "new", shape="70b")


def test_loaders_build_the_same_weights_every_time(random_tiny):
    thinker = load_thinker(random_tiny, "cpu", torch.float32).model
    first = thinker.state_dict()
    again = load_thinker(random_tiny, "cpu", torch.float32).model.state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    embeddings = thinker.get_input_embeddings().weight
    assert embeddings.std() > 0.01  # initialised, not zeros

    talker = load_talker(random_tiny, "cpu", torch.bfloat16)
    assert talker.talker.dtype == torch.bfloat16 and talker.token2wav.dtype == torch.float32
    head = talker.talker.codec_head.weight
    assert not head[VOCODER_CODES:].any() and head[:VOCODER_CODES].any()
    ids = [*SPEAKERS.values(), 151861, 151859]
    rows = load_thinker_embedding_rows(random_tiny, ids, "cpu", torch.float32)
    assert torch.equal(rows, embeddings[ids])


def test_engine_replies_as_generate_does(random_tiny):
    async def reply() -> ReplyDone:
        async with running_engine(EngineConfig(model_path=str(random_tiny))) as engine:
            await engine.open_session("s", SessionOptions())
            await engine.add_text("s", "Hello there, random model!")
            events = [e async for e in engine.respond("s", ReplyOptions(greedy=True, **LENGTHS))]
        return events[-1]

    done = asyncio.run(reply())
    assert done.status == "completed", done.error
    assert len(done.codec_tokens) == 24 and max(done.codec_tokens) < VOCODER_CODES
    assert done.audio_samples == 24 * SAMPLES_PER_CODE

    reference = ReferenceConversation(load_whole(random_tiny), load_processor(random_tiny))
    reference.user_turn(text="Hello there, random model!")
    expected = reference.generate(**LENGTHS)
    assert done.text_token_ids == expected.text_ids
    assert done.codec_tokens == expected.codes
