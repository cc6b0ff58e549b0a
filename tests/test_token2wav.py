"""Streaming Token2Wav against transformers' whole-utterance Token2Wav, on the tiny checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniToken2WavModel

from omni.checkpoints.parts import load_speakers, load_talker
from omni.engine.token2wav import StreamingToken2Wav, Token2WavOptions

SAMPLES_PER_CODE = 480
JOIN_WINDOW = 240  # samples each side of a join: the surrounding 20 ms at 24 kHz


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Qwen2_5OmniToken2WavModel:
    """The tiny checkpoint's Token2Wav (real classes; block size, repeats and hop are the real ones)."""
    return load_talker(tiny_checkpoint).token2wav.eval()


@pytest.fixture(scope="module")
def voice(tiny_checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    speaker = load_speakers(tiny_checkpoint)["Chelsie"]
    return speaker["cond"].float(), speaker["ref_mel"].float()


def random_codes(n: int, seed: int = 2) -> list[int]:
    return torch.randint(0, 8193, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream(decoder: StreamingToken2Wav, codes: list[int]) -> list[np.ndarray]:
    """Feed codes one at a time, as the talker makes them."""
    chunks = []
    for code in codes:
        chunks += decoder.push([code])
    return chunks + decoder.finish()


def join_roughness(audio: np.ndarray, join: int, guard: int = 2) -> float:
    """How abrupt the waveform is at `join`, relative to the 20 ms around it.

    The second difference y[n] - 2y[n-1] + y[n-2] measures how far a sample leaves the straight
    line through the two before it. A step or kink at a join makes it spike. The result is its
    largest value within `guard` samples of the join, divided by its largest value elsewhere in
    the surrounding 20 ms. Above 1, the join is rougher than anything the signal does nearby.
    """
    curvature = np.abs(np.diff(audio, n=2, prepend=audio[:2]))
    near = curvature[join - guard : join + guard + 2]
    around = np.concatenate(
        [
            curvature[join - JOIN_WINDOW : join - guard],
            curvature[join + guard + 2 : join + JOIN_WINDOW],
        ]
    )
    return float(near.max() / around.max())


def speech_like(model: Qwen2_5OmniToken2WavModel) -> Qwen2_5OmniToken2WavModel:
    """A copy whose vocoder output is band-limited like voiced speech, so a click can be seen.

    With random weights BigVGAN turns every mel frame into broadband noise. In noise the
    sample-to-sample jumps are as large as the signal, so a join can't stand out. In this copy:
    - the first conv smooths over mel frames;
    - every upsampler after the first interpolates linearly (random channel mixing times a
      triangular kernel);
    - the residual blocks pass their input through.
    The output then sits at a few hundred Hz, smooth from sample to sample, and a discontinuity
    shows.
    """
    model = copy.deepcopy(model)
    vocoder = model.code2wav_bigvgan_model
    generator = torch.Generator().manual_seed(0)

    def smooth(conv: torch.nn.Module, window: torch.Tensor) -> None:
        mixing = torch.randn(*conv.weight.shape[:2], 1, generator=generator)
        conv.weight.copy_(mixing / conv.in_channels**0.5 * window[1:-1])
        conv.bias.zero_()

    with torch.no_grad():
        smooth(vocoder.conv_pre, torch.hann_window(vocoder.conv_pre.kernel_size[0] + 2))
        for (up,) in vocoder.ups[1:]:
            smooth(up, torch.bartlett_window(up.kernel_size[0] + 2))
        for block in vocoder.resblocks:
            for conv in block.convs2:
                conv.weight.zero_()
                conv.bias.zero_()
    return model


def test_one_chunk_equals_transformers(model, voice) -> None:
    conditioning, reference_mel = voice
    for n, options in [(23, Token2WavOptions()), (100, Token2WavOptions(chunk_codes=(120,)))]:
        codes = random_codes(n)
        torch.manual_seed(7)  # transformers' sample() draws its noise from the global generator
        with torch.no_grad():
            expected = model(torch.tensor([codes]), conditioning, reference_mel).numpy()

        decoder = StreamingToken2Wav(
            model, conditioning, reference_mel, options, generator=torch.Generator().manual_seed(7)
        )
        assert decoder.push(codes) == []  # fewer codes than the first chunk and its lookahead
        (audio,) = decoder.finish()

        assert audio.dtype == np.float32 and audio.shape == (n * SAMPLES_PER_CODE,)
        np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_frame_local_dit_streams_exactly(model, voice) -> None:
    """With attention switched off, each mel frame depends only on its own code and noise.

    Then every window agrees with the whole-utterance decode, so the streamed audio must equal
    transformers' output everywhere. The chunk joins go through the same vocoder context,
    cross-fades and sample bookkeeping as with real attention.
    """
    local = copy.deepcopy(model)
    with torch.no_grad():
        for layer in local.code2wav_dit_model.transformer_blocks:
            layer.attn.to_out[0].weight.zero_()
            layer.attn.to_out[0].bias.zero_()
    conditioning, reference_mel = voice
    codes = random_codes(100, seed=16)
    torch.manual_seed(17)
    with torch.no_grad():
        expected = local(torch.tensor([codes]), conditioning, reference_mel).numpy()

    options = Token2WavOptions(chunk_codes=(12, 24))
    decoder = StreamingToken2Wav(
        local, conditioning, reference_mel, options, generator=torch.Generator().manual_seed(17)
    )
    audio = np.concatenate(stream(decoder, codes))
    np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_criterion_flags_a_step_not_a_smooth_signal() -> None:
    t = np.arange(9600) / 24_000
    tone = np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    assert join_roughness(tone, 4800) < 1
    stepped = tone.copy()
    stepped[4800:] += 0.1  # a 10% step: a click
    assert join_roughness(stepped, 4800) > 2


def test_small_chunks_join_without_clicks(model, voice) -> None:
    smooth_model = speech_like(model)
    conditioning, reference_mel = voice
    codes = random_codes(150, seed=3)
    options = Token2WavOptions(solver="euler", chunk_codes=(12, 24))
    decoder = StreamingToken2Wav(
        smooth_model,
        conditioning,
        reference_mel,
        options,
        generator=torch.Generator().manual_seed(4),
    )
    chunks = stream(decoder, codes)
    audio = np.concatenate(chunks)
    assert audio.shape == (len(codes) * SAMPLES_PER_CODE,)
    boundaries = [12, 36, 60, 84, 108, 132]  # codes; the last 18 come with finish()
    assert len(chunks) == len(boundaries) + 1

    returned = np.cumsum([len(c) for c in chunks])[:-1]  # where one returned chunk meets the next
    dit_boundaries = np.array(boundaries) * SAMPLES_PER_CODE  # where one DiT window meets the next
    ours = [join_roughness(audio, j) for j in [*returned, *dit_boundaries]]

    # the same chunks decoded one by one with transformers, no context, no overlap
    naive = []
    torch.manual_seed(4)
    with torch.no_grad():
        for lo, hi in zip([0, *boundaries], [*boundaries, len(codes)]):
            naive.append(
                smooth_model(torch.tensor([codes[lo:hi]]), conditioning, reference_mel).numpy()
            )
    naive_audio = np.concatenate(naive)
    naive_roughness = [
        join_roughness(naive_audio, j) for j in np.cumsum([len(c) for c in naive])[:-1]
    ]

    assert max(ours) < 1, ours
    assert max(naive_roughness) > 1, naive_roughness
    assert np.mean(naive_roughness) > 3 * np.mean(ours)


def test_first_chunk_after_one_block_and_its_lookahead(model, voice) -> None:
    conditioning, reference_mel = voice
    decoder = StreamingToken2Wav(
        model, conditioning, reference_mel, generator=torch.Generator().manual_seed(5)
    )
    assert decoder.options.chunk_codes == (12, 24, 48)
    assert decoder.first_chunk_codes == 24

    returned_at = {}
    for i, code in enumerate(random_codes(110), start=1):
        chunks = decoder.push([code])
        if chunks:
            returned_at[i] = sum(len(c) for c in chunks)
    crossfade = decoder.options.crossfade_samples
    # chunk k comes once its last code and one more block (12 codes) of lookahead are in;
    # the last `crossfade` samples before its end wait for the next chunk
    assert returned_at == {
        24: 12 * SAMPLES_PER_CODE - crossfade,
        48: 24 * SAMPLES_PER_CODE,
        96: 48 * SAMPLES_PER_CODE,
    }
    (rest,) = decoder.finish()
    assert len(rest) == (110 - 84) * SAMPLES_PER_CODE + crossfade


def test_reset_then_reuse(model, voice) -> None:
    conditioning, reference_mel = voice
    codes = random_codes(60, seed=6)
    fresh = StreamingToken2Wav(
        model, conditioning, reference_mel, generator=torch.Generator().manual_seed(8)
    )
    expected = np.concatenate(stream(fresh, codes))

    decoder = StreamingToken2Wav(
        model, conditioning, reference_mel, generator=torch.Generator().manual_seed(9)
    )
    assert decoder.push(random_codes(30, seed=10))  # a first chunk of another reply
    decoder.reset(generator=torch.Generator().manual_seed(8))
    assert decoder.codes_pushed == 0
    np.testing.assert_array_equal(np.concatenate(stream(decoder, codes)), expected)

    with pytest.raises(RuntimeError):
        decoder.push(codes[:1])  # finished: the next reply needs reset()


def test_reset_during_a_decode_cancels_it(model, voice, monkeypatch) -> None:
    """reset() from another thread (barge-in) stops a decode at its next DiT call."""
    conditioning, reference_mel = voice
    decoder = StreamingToken2Wav(
        model, conditioning, reference_mel, generator=torch.Generator().manual_seed(11)
    )
    dit_class = type(model.code2wav_dit_model)
    forward = dit_class.forward
    calls = []

    def reset_on_first_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            decoder.reset(generator=torch.Generator().manual_seed(12))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(dit_class, "forward", reset_on_first_call)
    assert decoder.push(random_codes(24)) == []
    assert len(calls) == 1 and decoder.codes_pushed == 0
    monkeypatch.undo()

    codes = random_codes(40, seed=13)
    fresh = StreamingToken2Wav(
        model, conditioning, reference_mel, generator=torch.Generator().manual_seed(12)
    )
    np.testing.assert_array_equal(
        np.concatenate(stream(decoder, codes)), np.concatenate(stream(fresh, codes))
    )
