"""The Qwen3-Omni streamer against transformers' generate() on the tiny config (fp32, CPU).

The model has random weights from a fixed seed, scaled up so that the greedy reply depends on
the prompt (at the default 0.02 init every prompt gives the same reply) and Code2Wav's output
is well above float rounding (its layer scales start at 1e-6 and 0.01).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from transformers import Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    _get_feat_extract_output_lengths,
)

from omni.bench.qwen3 import (
    WAV_TOLERANCE,
    Reply,
    chat_prompt,
    reference_reply,
    run_bench,
    streamed_reply,
    wav_error,
)
from omni.checkpoints.random_shapes import init_talker_experts
from omni.checkpoints.tiny_qwen3_config import (
    AUDIO_END,
    AUDIO_START,
    AUDIO_TOKEN,
    tiny_qwen3_config,
)
from omni.engine.qwen3_code2wav import AudioChunk, Code2WavBatch
from omni.engine.qwen3_stream import CodecFrame, Qwen3OmniStreamer, StreamOptions, TextToken

OPTIONS = StreamOptions(max_text_tokens=12, max_codec_frames=30)
LOGITS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> Qwen3OmniMoeForConditionalGeneration:
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_config()).eval()
    init_talker_experts(model.talker)  # transformers leaves them torch.empty
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("code2wav"):
                if "gamma" in name or "scale" in name:
                    param.fill_(1.0)
                elif param.dim() >= 2:
                    param.mul_(3.0)
            elif param.dim() >= 2:
                param.mul_(4.0)
    return model


def _text_prompt(model, words: list[int]) -> tuple[torch.Tensor, dict]:
    return chat_prompt(model.config, words), {}


def _audio_prompt(model) -> tuple[torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(1)
    mel_frames = 300  # 3 s of log-mel
    tokens = int(_get_feat_extract_output_lengths(torch.tensor(mel_frames)))
    ids = chat_prompt(model.config, [AUDIO_START, *[AUDIO_TOKEN] * tokens, AUDIO_END, 3000])
    media = {
        "input_features": torch.randn(1, 128, mel_frames, generator=generator),
        "feature_attention_mask": torch.ones(1, mel_frames, dtype=torch.long),
    }
    return ids, media


PROMPTS = {
    "text": lambda model: _text_prompt(model, [3000, 4000, 5000]),
    "other text": lambda model: _text_prompt(model, [777, 12345, 90000, 42]),
    "audio": _audio_prompt,
}


def first_seen_late(ids: list[int]) -> int:
    """The id that first appears latest, from the third place on and before the last (as an
    end token it ends the reply early, after at least two tokens: generate() cannot voice a
    reply of one)."""
    return [t for i, t in enumerate(ids) if ids.index(t) == i and 2 <= i < len(ids) - 1][-1]


@dataclass
class Ending:
    options: StreamOptions  # OPTIONS with a text eos the greedy reply produces
    text_ended: Reply  # the reply with that text eos and the codec's own eos
    frames: int  # where the codec eos set now ends its speech


@contextmanager
def ending_on_their_own(model, ids: torch.Tensor) -> Iterator[Ending]:
    """Replies that end on their own: the text eos set to a token of the capped greedy reply,
    the codec eos (in the model's talker config, restored after) to a first code it produces."""
    capped = reference_reply(model, ids, OPTIONS)
    options = replace(OPTIONS, text_eos=(first_seen_late(capped.text_ids),))
    text_ended = reference_reply(model, ids, options)
    first_codes = text_ended.codes[0, :20].tolist()
    codec_eos = max(set(first_codes), key=first_codes.index)
    talker_config = model.config.talker_config
    saved = talker_config.codec_eos_token_id
    talker_config.codec_eos_token_id = codec_eos
    try:
        yield Ending(options, text_ended, first_codes.index(codec_eos))
    finally:
        talker_config.codec_eos_token_id = saved


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_reply_equals_generate(model, prompt):
    ids, media = PROMPTS[prompt](model)
    reference = reference_reply(model, ids, OPTIONS, **media)
    streamed, _ = streamed_reply(model, ids, OPTIONS, **media)
    assert streamed.text_ids == reference.text_ids
    assert streamed.codes.shape == reference.codes.shape == (16, OPTIONS.max_codec_frames - 1)
    assert torch.equal(streamed.codes, reference.codes)
    assert streamed.wav.shape == reference.wav.shape
    assert wav_error(streamed.wav, reference.wav) <= WAV_TOLERANCE
    assert reference.wav.abs().max() > 1e-3  # not silence


def test_replies_that_end_on_their_own_equal_generate(model):
    """The capped replies above never reach an end token: here the text ends with an eos
    (tts_eos goes in its place) and the speech with the codec eos, both as generate() does.
    The eos ids are set to a text token and a first code the greedy reply produces."""
    ids, _ = PROMPTS["other text"](model)
    with ending_on_their_own(model, ids) as ending:
        reference = reference_reply(model, ids, ending.options)
        streamed, _ = streamed_reply(model, ids, ending.options)
    assert streamed.text_ids == reference.text_ids == ending.text_ended.text_ids
    assert reference.text_ids[-1] == ending.options.text_eos[0] and len(reference.text_ids) < 12
    assert torch.equal(streamed.codes, reference.codes)
    assert 2 <= reference.codes.shape[1] == ending.frames
    assert streamed.wav.shape == reference.wav.shape
    assert wav_error(streamed.wav, reference.wav) <= WAV_TOLERANCE


@pytest.mark.parametrize("prompt", ["text", "audio"])
def test_thinker_logits_per_step_match_generate(model, prompt):
    ids, media = PROMPTS[prompt](model)
    reference = model.thinker.generate(
        ids,
        max_new_tokens=OPTIONS.max_text_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **media,
    )
    streamer = Qwen3OmniStreamer(model, OPTIONS)
    tokens = streamer.thinker_tokens(ids, **media)
    next(tokens)  # the prompt's states
    steps = list(tokens)
    assert len(steps) == len(reference.logits)
    for step, logits in zip(steps, reference.logits):
        assert torch.allclose(step.logits, logits[0].float(), atol=LOGITS_TOLERANCE, rtol=0)


def test_different_prompts_give_different_replies(model):
    """The equality above could not hold by accident: the replies depend on the prompt."""
    first, _ = streamed_reply(model, *PROMPTS["text"](model)[:1], OPTIONS)
    second, _ = streamed_reply(model, *PROMPTS["other text"](model)[:1], OPTIONS)
    audio_ids, media = PROMPTS["audio"](model)
    heard, _ = streamed_reply(model, audio_ids, OPTIONS, **media)
    assert first.text_ids != second.text_ids
    assert first.text_ids != heard.text_ids
    assert not torch.equal(first.codes, second.codes)
    assert not torch.equal(first.codes, heard.codes)


def test_audio_starts_after_the_first_frames_and_text_leads_speech(model):
    ids, _ = PROMPTS["text"](model)
    events = list(Qwen3OmniStreamer(model, OPTIONS).stream(ids))
    kinds = [type(event) for event in events]
    first_audio = kinds.index(AudioChunk)
    # Code2Wav's lookahead is under one frame here: audio follows the first frame
    assert kinds[:first_audio].count(CodecFrame) == 1
    # frame 0 needs only the reply's first token, and the talker input that makes frame k adds
    # token k (generate()'s trailing text): frame k follows k + 1 tokens, none pulled further ahead
    text_tokens = kinds.count(TextToken)
    for position, event in enumerate(events):
        if isinstance(event, CodecFrame):
            assert kinds[:position].count(TextToken) == min(event.index + 1, text_tokens)
    chunks = [event for event in events if isinstance(event, AudioChunk)]
    starts = [chunk.start_sample for chunk in chunks]
    assert starts == [
        sum(chunk.samples.numel() for chunk in chunks[:i]) for i in range(len(chunks))
    ]


def test_code2wav_stream_is_exact_with_its_left_context_and_not_with_less(model):
    """Long random codes (past the pre-transformer's reach): exact with the default context of
    states before each window (the convolutions' reach), not with less."""
    code2wav = model.code2wav
    codes = torch.randint(0, 2048, (1, 16, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = code2wav(codes).reshape(-1)

    def streamed(left_context: int, chunk_frames: int) -> torch.Tensor:
        batch = Code2WavBatch(code2wav, left_context, chunk_frames)
        stream = batch.stream()
        chunks = []
        for frame in codes[0].T:
            stream.add(frame.tolist())
            chunks += batch.ready_chunks(stream)
        stream.finish()
        chunks += batch.ready_chunks(stream)
        assert stream.done
        return torch.cat([chunk.samples for chunk in chunks])

    config = code2wav.config
    assert config.num_hidden_layers * (config.sliding_window - 1) < codes.shape[-1]
    context = Code2WavBatch(code2wav).left_context_frames
    assert context == 10  # the real upsampling layout (the tiny config keeps it)
    for chunk_frames in (1, 7):
        wav = streamed(context, chunk_frames)
        assert wav.shape == whole.shape
        assert wav_error(wav, whole) <= WAV_TOLERANCE
    # the convolutions reach further back (their last frame of reach weighs little: with one
    # frame less the error stays within tolerance on these weights, not with two)
    short = streamed(context - 2, 4)
    assert wav_error(short, whole) > 5 * WAV_TOLERANCE


def test_sampled_reply_follows_its_seed(model):
    ids, _ = PROMPTS["text"](model)

    def reply(seed: int) -> tuple[list[int], torch.Tensor]:
        options = StreamOptions(greedy=False, seed=seed, max_text_tokens=8, max_codec_frames=10)
        events = list(Qwen3OmniStreamer(model, options).stream(ids))
        text = [event.token_id for event in events if isinstance(event, TextToken)]
        return text, torch.stack([event.codes for event in events if isinstance(event, CodecFrame)])

    text, codes = reply(5)
    again_text, again_codes = reply(5)
    other_text, other_codes = reply(6)
    assert text == again_text and torch.equal(codes, again_codes)
    assert text != other_text or not torch.equal(codes, other_codes)


def test_bad_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown speaker 'Nobody'; known: aiden, chelsie, ethan"):
        Qwen3OmniStreamer(model, StreamOptions(speaker="Nobody"))
    ids, _ = PROMPTS["text"](model)
    with pytest.raises(ValueError, match="assistant header"):
        list(Qwen3OmniStreamer(model, OPTIONS).stream(ids[:, :-3]))
    with pytest.raises(ValueError, match=r"shape \(1, T\)"):
        list(Qwen3OmniStreamer(model, OPTIONS).stream(ids.repeat(2, 1)))
    with pytest.raises(ValueError, match="max_codec_frames must be at least 1, got 0"):
        StreamOptions(max_codec_frames=0)
    with pytest.raises(ValueError, match="left_context_frames must be at least 1"):
        Code2WavBatch(model.code2wav, 0)


def test_bench_writes_first_audio_rtf_and_match(model, tmp_path, capsys):
    path = tmp_path / "qwen3.json"
    bench = run_bench(
        model, options=StreamOptions(max_text_tokens=6, max_codec_frames=12), json_path=path
    )
    data = json.loads(path.read_text())
    assert data["sessions"] == 1
    assert data["matches_reference"] is True and bench.matches_reference
    for side in ("streaming", "reference"):
        assert data[side]["first_audio_ms"] > 0 and data[side]["rtf"] > 0
    assert "matches_reference: True" in capsys.readouterr().out
