"""The tiny Qwen3-Omni checkpoint, its presets and loading, and the family's voices.

The checkpoint is loaded through transformers' own Qwen3-Omni classes, and its generate()
(thinker, talker with code predictor, Code2Wav) must give text and a waveform.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fake_engine import fake_engine
from realtime_helpers import API_KEY, recv_until, running_server, send_event
from test_checkpoints import _assert_same_tensors, _fake_cached_snapshot
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen3OmniMoeForConditionalGeneration,
)

from omni.bench.qwen3 import text_prompt
from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.family import QWEN2_5_OMNI, QWEN3_OMNI, family_of
from omni.checkpoints.hub import is_complete
from omni.checkpoints.loader import resolve_model
from omni.checkpoints.parts import load_code2wav, load_talker_lm, load_thinker, load_whole
from omni.checkpoints.presets import load_presets
from omni.checkpoints.processor import load_processor
from omni.checkpoints.tiny_cache import tiny_variant
from omni.checkpoints.tiny_qwen3_config import tiny_qwen3_config
from omni.cli import main
from omni.session.client_events import SessionIn
from omni.session.config import SessionConfig
from omni.session.errors import RealtimeError
from omni.settings import Settings

PROMPTS = (
    "Hello there",
    "What is the weather like in Paris today?",
    "Tell me a story about a dragon and a knight.",
)


@pytest.fixture(scope="module")
def model(tiny_qwen3_checkpoint: Path) -> Qwen3OmniMoeForConditionalGeneration:
    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_qwen3_checkpoint).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_checkpoint: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_qwen3_checkpoint)


def _generate(
    model: Qwen3OmniMoeForConditionalGeneration, ids: torch.Tensor, speaker: str = "Ethan"
) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        sequences, wav = model.generate(
            input_ids=ids,
            speaker=speaker,
            return_audio=True,
            thinker_max_new_tokens=16,
            thinker_do_sample=False,
            talker_max_new_tokens=12,
            talker_do_sample=False,
        )
    return sequences[0, ids.shape[1] :].tolist(), wav


# the config


def test_config_keeps_the_real_checkpoints_ids_and_layout() -> None:
    config = tiny_qwen3_config()
    thinker, talker = config.thinker_config, config.talker_config
    text = thinker.text_config
    assert config.model_type == "qwen3_omni_moe"
    assert text.vocab_size == 152064 and talker.text_config.vocab_size == 3072
    assert (thinker.audio_token_id, thinker.image_token_id, thinker.video_token_id) == (
        151675,
        151655,
        151656,
    )
    assert (config.tts_pad_token_id, config.tts_bos_token_id, config.tts_eos_token_id) == (
        151671,
        151672,
        151673,
    )
    codec = (talker.codec_bos_id, talker.codec_eos_token_id, talker.codec_pad_id)
    assert codec == (2149, 2150, 2148)
    assert talker.speaker_id == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert talker.num_code_groups == talker.code_predictor_config.num_code_groups == 16
    assert config.code2wav_config.num_quantizers == 16
    assert talker.code_predictor_config.vocab_size == config.code2wav_config.codebook_size == 2048
    # the talker reads a middle layer of the thinker, as the real one reads 24 of 48
    assert 0 < talker.accept_hidden_layer < text.num_hidden_layers
    assert text.num_experts > text.num_experts_per_tok > 1
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert config.code2wav_config.sliding_window == 72
    assert thinker.audio_config.output_dim == thinker.vision_config.out_hidden_size
    assert thinker.vision_config.out_hidden_size == text.hidden_size
    assert talker.thinker_hidden_size == text.hidden_size


# the checkpoint directory


def test_tiny_checkpoint_is_a_complete_qwen3_omni_directory(tiny_qwen3_checkpoint: Path) -> None:
    files = {path.name for path in tiny_qwen3_checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    } <= files
    assert len([name for name in files if name.endswith(".safetensors")]) > 1  # sharded
    assert "spk_dict.pt" not in files  # Qwen3-Omni's voices are in its config
    assert is_complete(tiny_qwen3_checkpoint)
    assert family_of(tiny_qwen3_checkpoint) is QWEN3_OMNI
    assert tiny_variant(tiny_qwen3_checkpoint) == "tiny-qwen3-omni"
    config = json.loads((tiny_qwen3_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]


def test_tokenizer_and_processor_use_qwen3_omnis_ids(
    tiny_qwen3_checkpoint: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>"]
        + ["<tts_text_eod>", "<|audio_pad|>", "<|image_pad|>", "<|vision_start|>", "</think>"]
    )
    assert ids == [151644, 151669, 151670, 151671, 151672, 151673, 151675, 151655, 151652, 151668]
    assert tokenizer.decode(tokenizer("Hello, world!").input_ids) == "Hello, world!"
    processor = load_processor(tiny_qwen3_checkpoint)
    content = [{"type": "audio", "audio": "clip"}, {"type": "text", "text": "hi"}]
    messages = [{"role": "user", "content": content}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = processor(text=rendered, audio=[np.zeros(32000, np.float32)], return_tensors="pt")
    placeholders = int((inputs["input_ids"] == 151675).sum())
    assert placeholders > 1  # the one placeholder became one per audio frame
    assert inputs["input_features"].shape[1] == 128  # mel bins


# the real transformers classes run it


def test_generate_gives_text_and_a_waveform(
    model: Qwen3OmniMoeForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = text_prompt(tokenizer, PROMPTS[1])
    reply, wav = _generate(model, ids, speaker="Aiden")
    assert len(reply) == 16 and tokenizer.decode(reply).strip()
    assert wav.dim() == 3 and wav.shape[:2] == (1, 1)
    # 12 frames of 1920 samples, less what the causal convolutions hold back
    assert 10 * 1920 < wav.shape[-1] <= 12 * 1920
    assert torch.isfinite(wav).all() and float(wav.pow(2).mean().sqrt()) > 0.05


def test_greedy_replies_depend_on_the_input(
    model: Qwen3OmniMoeForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> None:
    replies = [_generate(model, text_prompt(tokenizer, text))[0] for text in PROMPTS]
    assert len({tuple(reply) for reply in replies}) == len(PROMPTS)
    for reply in replies:
        assert len(set(reply)) >= 5, tokenizer.decode(reply)
        # no placeholder in a reply: the next turn would count it as a slot for features
        assert not {151675, 151655, 151656} & set(reply)


def test_each_family_voice_is_a_speaker_of_the_checkpoint(
    model: Qwen3OmniMoeForConditionalGeneration,
) -> None:
    speakers = set(model.config.talker_config.speaker_id)
    assert {voice.lower() for voice in QWEN3_OMNI.voices} == speakers


# presets and resolution


def test_presets_name_the_real_and_the_tiny_qwen3_omni() -> None:
    presets = load_presets()
    assert presets["qwen3-omni-30b-a3b-instruct"].hub_id == "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    assert presets["tiny-qwen3-omni"].make == "tiny-qwen3-omni"


def test_resolving_the_tiny_preset_and_its_directory(
    tiny_qwen3_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNI_CACHE", str(tiny_qwen3_checkpoint.parent))
    by_preset = resolve_model("tiny-qwen3-omni")
    assert by_preset.path == tiny_qwen3_checkpoint and by_preset.family is QWEN3_OMNI
    assert by_preset.is_tiny and by_preset.max_codec_tokens == 64
    by_dir = resolve_model(str(tiny_qwen3_checkpoint))
    assert by_dir.family is QWEN3_OMNI and by_dir.max_codec_tokens == 64


def test_a_missing_download_is_a_one_line_error(hf_cache: Path) -> None:
    missing = "Qwen/Qwen3-Omni-30B-A3B-Instruct is not in the local"
    with pytest.raises(CheckpointError, match=missing) as caught:
        resolve_model("qwen3-omni-30b-a3b-instruct")
    assert "\n" not in str(caught.value) and "hf download" in str(caught.value)


def test_a_cached_snapshot_is_found_without_a_speakers_file(
    hf_cache: Path, tiny_qwen3_checkpoint: Path
) -> None:
    repo = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    snapshot = _fake_cached_snapshot(hf_cache, repo, tiny_qwen3_checkpoint)
    resolved = resolve_model("qwen3-omni-30b-a3b-instruct")
    assert resolved.path == snapshot and resolved.family is QWEN3_OMNI
    assert resolve_model(repo).family is QWEN3_OMNI


def test_cli_make_tiny_builds_the_same_qwen3_checkpoint(
    tmp_path: Path, tiny_qwen3_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "q3"
    assert main(["models", "make-tiny", "--variant", "tiny-qwen3-omni", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target.resolve())
    for name in ("config.json", "model.safetensors.index.json", "chat_template.jinja"):
        assert (target / name).read_text() == (tiny_qwen3_checkpoint / name).read_text()
    for shard in sorted(target.glob("*.safetensors")):
        assert shard.read_bytes() == (tiny_qwen3_checkpoint / shard.name).read_bytes()


# voices


def _config(voices: tuple[str, ...]) -> SessionConfig:
    return SessionConfig.from_settings(Settings(), voices=voices)


def test_voices_come_from_the_family() -> None:
    qwen3 = _config(QWEN3_OMNI.voices)
    assert qwen3.voice == "Ethan"  # the family's default
    assert qwen3.updated(SessionIn(voice="aiden")).voice == "Aiden"
    assert qwen3.updated(SessionIn(voice="marin")).voice == "Ethan"  # OpenAI's names: default
    with pytest.raises(RealtimeError) as caught:
        qwen3.updated(SessionIn(voice="Serena"))
    assert caught.value.param == "session.voice"
    assert caught.value.message.endswith("this model speaks as Ethan, Chelsie, Aiden")
    with pytest.raises(RealtimeError, match="speaks as Chelsie, Ethan"):
        _config(QWEN2_5_OMNI.voices).updated(SessionIn(voice="Aiden"))


async def test_a_qwen3_server_offers_and_accepts_its_voices() -> None:
    async with running_server(fake_engine, voices=QWEN3_OMNI.voices) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            config = await client.get(
                "/v1/realtime/calls/config", headers={"Authorization": f"Bearer {API_KEY}"}
            )
        assert config.json()["voices"] == ["Ethan", "Chelsie", "Aiden"]
        async with server.ws() as ws:
            created = (await recv_until(ws, "session.created"))[-1]["session"]
            assert created["audio"]["output"]["voice"] == "Ethan"
            voice = {"type": "realtime", "audio": {"output": {"voice": "aiden"}}}
            await send_event(ws, {"type": "session.update", "session": voice})
            updated = (await recv_until(ws, "session.updated"))[-1]["session"]
            assert updated["audio"]["output"]["voice"] == "Aiden"
            unknown = {"type": "realtime", "audio": {"output": {"voice": "Serena"}}}
            await send_event(ws, {"type": "session.update", "session": unknown})
            error = (await recv_until(ws, "error"))[-1]["error"]
            assert "Ethan, Chelsie, Aiden" in error["message"]


def test_each_part_loads_alone_equal_to_the_whole(
    tiny_qwen3_checkpoint: Path, model: Qwen3OmniMoeForConditionalGeneration
) -> None:
    thinker = load_thinker(tiny_qwen3_checkpoint)
    _assert_same_tensors(thinker.model, model.thinker)
    assert thinker.processor.audio_token == "<|audio_pad|>"
    _assert_same_tensors(load_talker_lm(tiny_qwen3_checkpoint), model.talker)
    _assert_same_tensors(load_code2wav(tiny_qwen3_checkpoint), model.code2wav)
    whole = load_whole(tiny_qwen3_checkpoint)
    assert isinstance(whole, Qwen3OmniMoeForConditionalGeneration)
    assert load_talker_lm(tiny_qwen3_checkpoint, dtype=torch.bfloat16).dtype == torch.bfloat16
