"""Streaming Token2Wav against transformers' whole-utterance Token2Wav, on the tiny checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import Qwen2_5OmniToken2WavModel

from omni.checkpoints.parts import load_speakers, load_talker
from omni.engine.token2wav import Token2WavBatch, Token2WavOptions, Token2WavStream
from omni.settings import Settings

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


def make_stream(
    model: Qwen2_5OmniToken2WavModel,
    voice: tuple[torch.Tensor, torch.Tensor],
    options: Token2WavOptions = Token2WavOptions(),
    seed: int = 0,
) -> Token2WavStream:
    conditioning, reference_mel = voice
    return Token2WavBatch(model, options).stream(
        conditioning, reference_mel, torch.Generator().manual_seed(seed)
    )


def decode_all(decoder: Token2WavStream) -> list[np.ndarray]:
    """Decode the stream alone until no chunk is ready."""
    chunks = []
    while (audio := decoder.batch.decode_ready([decoder])[0]) is not None:
        chunks.append(audio)
    return chunks


def push(decoder: Token2WavStream, codes: list[int]) -> list[np.ndarray]:
    decoder.add(codes)
    return decode_all(decoder)


def finish(decoder: Token2WavStream) -> list[np.ndarray]:
    decoder.finish()
    return decode_all(decoder)


def stream(decoder: Token2WavStream, codes: list[int]) -> list[np.ndarray]:
    """Feed codes one at a time, as the talker makes them."""
    chunks = []
    for code in codes:
        chunks += push(decoder, [code])
    return chunks + finish(decoder)


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

        decoder = make_stream(model, voice, options, seed=7)
        assert push(decoder, codes) == []  # fewer codes than the first chunk and its lookahead
        (audio,) = finish(decoder)

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

    decoder = make_stream(local, voice, Token2WavOptions(chunk_codes=(12, 24)), seed=17)
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
    decoder = make_stream(smooth_model, voice, options, seed=4)
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
    decoder = make_stream(model, voice, seed=5)
    assert decoder.batch.options.chunk_codes == (12, 24, 48)
    assert decoder.batch.first_chunk_codes == 24

    returned_at = {}
    for i, code in enumerate(random_codes(110), start=1):
        chunks = push(decoder, [code])
        if chunks:
            returned_at[i] = sum(len(c) for c in chunks)
    crossfade = decoder.batch.options.crossfade_samples
    # chunk k comes once its last code and one more block (12 codes) of lookahead are in;
    # the last `crossfade` samples before its end wait for the next chunk
    assert returned_at == {
        24: 12 * SAMPLES_PER_CODE - crossfade,
        48: 24 * SAMPLES_PER_CODE,
        96: 48 * SAMPLES_PER_CODE,
    }
    (rest,) = finish(decoder)
    assert len(rest) == (110 - 84) * SAMPLES_PER_CODE + crossfade


def test_reset_then_reuse(model, voice) -> None:
    codes = random_codes(60, seed=6)
    expected = np.concatenate(stream(make_stream(model, voice, seed=8), codes))

    decoder = make_stream(model, voice, seed=9)
    assert push(decoder, random_codes(30, seed=10))  # a first chunk of another reply
    decoder.reset(generator=torch.Generator().manual_seed(8))
    assert decoder.codes_added == 0
    np.testing.assert_array_equal(np.concatenate(stream(decoder, codes)), expected)

    with pytest.raises(RuntimeError):
        decoder.add(codes[:1])  # finished: the next reply needs reset()


def test_reset_between_decodes_drops_the_ready_chunk(model, voice) -> None:
    """Barge-in: a reset between talker steps drops a chunk that was ready but not decoded."""
    decoder = make_stream(model, voice, seed=11)
    decoder.add(random_codes(24))
    assert decoder.has_ready_chunk
    decoder.reset(generator=torch.Generator().manual_seed(12))
    assert decoder.batch.decode_ready([decoder]) == [None] and decoder.codes_added == 0

    codes = random_codes(40, seed=13)
    fresh = make_stream(model, voice, seed=12)
    np.testing.assert_array_equal(
        np.concatenate(stream(decoder, codes)), np.concatenate(stream(fresh, codes))
    )


def dit_rows(model: Qwen2_5OmniToken2WavModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, for every DiT call from now on, how many rows (before CFG doubling) it took."""
    rows: list[int] = []
    dit_class = type(model.code2wav_dit_model)
    forward = dit_class.forward

    def counting(self, hidden_states, *args, **kwargs):
        rows.append(hidden_states.shape[0])
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(dit_class, "forward", counting)
    return rows


# Stacked rows go through other matmul blockings than a single row, and the ODE carries the
# rounding along: measured on the tiny checkpoint (CPU, float32) the batched audio is within
# 1.1e-5 of the peak of the audio decoded alone (3e-6 RMS). A wrong row (noise, voice, codes)
# would differ by the order of the signal itself.
BATCH_ATOL = 1e-4  # times the peak


@pytest.mark.parametrize("solver", ["rk4", "euler"])
def test_batched_decode_equals_each_stream_decoded_alone(
    model, tiny_checkpoint, solver, monkeypatch
) -> None:
    speakers = load_speakers(tiny_checkpoint)
    voices = [(s["cond"].float(), s["ref_mel"].float()) for s in speakers.values()]
    options = Token2WavOptions(solver=solver, num_steps=4, first_chunk_steps=3)
    # different lengths, voices, seeds, and start times: streams sit at different chunks,
    # so a decode has groups of several rows and groups of one
    lengths, starts = [110, 75, 23, 90], [0, 0, 5, 30]
    codes = [random_codes(n, seed=20 + i) for i, n in enumerate(lengths)]
    alone = [
        stream(make_stream(model, voices[i % 2], options, seed=30 + i), codes[i])
        for i in range(len(codes))
    ]

    rows = dit_rows(model, monkeypatch)
    batch = Token2WavBatch(model, options)
    streams = [
        batch.stream(*voices[i % 2], torch.Generator().manual_seed(30 + i))
        for i in range(len(codes))
    ]
    batched: list[list[np.ndarray]] = [[] for _ in streams]
    step = 0
    while not all(s.done for s in streams):
        for s, c, start in zip(streams, codes, starts):  # one talker step: a code per stream
            k = step - start
            if 0 <= k < len(c):
                s.add([c[k]])
            elif k == len(c):
                s.finish()
        for chunks, audio in zip(batched, batch.decode_ready(streams)):
            if audio is not None:
                chunks.append(audio)
        step += 1

    assert max(rows) > 1  # some DiT calls did stack several streams
    for ours, reference, n in zip(batched, alone, lengths):
        assert [len(a) for a in ours] == [len(a) for a in reference]
        audio, expected = np.concatenate(ours), np.concatenate(reference)
        assert audio.shape == (n * SAMPLES_PER_CODE,)
        atol = BATCH_ATOL * np.abs(expected).max()
        np.testing.assert_allclose(audio, expected, rtol=0, atol=atol)


@pytest.mark.parametrize(("solver", "passes"), [("rk4", [8, 20, 20]), ("euler", [2, 5, 5])])
def test_first_chunk_steps_change_only_the_first_chunk(
    model, voice, solver, passes, monkeypatch
) -> None:
    codes = random_codes(110, seed=40)
    same = Token2WavOptions(solver=solver, num_steps=6)
    fewer = Token2WavOptions(solver=solver, num_steps=6, first_chunk_steps=3)
    reference = stream(make_stream(model, voice, same, seed=41), codes)

    rows = dit_rows(model, monkeypatch)
    decoder = make_stream(model, voice, fewer, seed=41)
    chunks, dit_calls = [], []
    for code in codes:
        decoder.add([code])
        if decoder.has_ready_chunk:
            before = len(rows)
            chunks += decode_all(decoder)
            dit_calls.append(len(rows) - before)
    chunks += finish(decoder)

    # 3 time points are 2 solver steps, 6 are 5; RK4 makes 4 DiT passes a step, Euler 1
    assert dit_calls == passes == [fewer.dit_passes(3), fewer.dit_passes(6), fewer.dit_passes(6)]
    assert [len(c) for c in chunks] == [len(c) for c in reference]
    # A coarser first solve. (The tiny DiT's flow is nearly straight, so fewer steps move the
    # RK4 result only by ~2.5e-4 of the peak; both decodes are alone, so that is no rounding.)
    assert np.abs(chunks[0] - reference[0]).max() > 1e-4 * np.abs(reference[0]).max()
    # The second chunk starts with a cross-fade from the first window's lookahead and is
    # vocoded with the first chunk's mel as context, so it differs too. From the third chunk
    # on, nothing of the first window is left: the audio is the same.
    assert not np.array_equal(chunks[1], reference[1])
    for ours, theirs in zip(chunks[2:], reference[2:]):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"solver": "midpoint"}, "unknown ODE solver 'midpoint'"),
        ({"num_steps": 1}, "num_steps must be an integer of at least 2"),
        ({"num_steps": 4.5}, "num_steps must be an integer"),
        ({"first_chunk_steps": 0}, "first_chunk_steps must be an integer of at least 2"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"chunk_codes": ()}, "chunk sizes must be positive"),
        ({"crossfade_samples": -1}, "crossfade_samples must be >= 0"),
    ],
)
def test_bad_options_are_refused_with_a_clear_error(options, error) -> None:
    with pytest.raises(ValueError, match=error):
        Token2WavOptions(**options)


def test_options_that_do_not_fit_the_model_are_refused(model, voice) -> None:
    with pytest.raises(ValueError, match="multiples of 12 codes"):
        Token2WavBatch(model, Token2WavOptions(chunk_codes=(12, 30)))
    with pytest.raises(ValueError, match="fit in the vocoder context"):
        Token2WavBatch(model, Token2WavOptions(crossfade_samples=24 * 240 + 1))

    batch = Token2WavBatch(model)
    decoder = batch.stream(*voice)
    with pytest.raises(ValueError, match="appears twice"):
        batch.decode_ready([decoder, decoder])
    with pytest.raises(ValueError, match="another Token2WavBatch"):
        Token2WavBatch(model).decode_ready([decoder])
    with pytest.raises(ValueError, match="out of the DiT's range"):
        decoder.add([8292])  # the codec pad: a talker code the DiT has no embedding for


def test_vocoder_step_settings_are_validated() -> None:
    assert Settings(vocoder_steps=6, vocoder_first_chunk_steps=3).vocoder_first_chunk_steps == 3
    with pytest.raises(ValidationError, match="vocoder_steps"):
        Settings(vocoder_steps=1)
    with pytest.raises(ValidationError, match="vocoder_first_chunk_steps"):
        Settings(vocoder_first_chunk_steps=1)
