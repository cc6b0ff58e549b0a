"""Streaming log-mel against transformers' offline extractor; resampling; G.711."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from omni.engine.audio_features import (
    StreamingLogMel,
    num_audio_tokens,
    num_frames,
    qwen_feature_extractor,
)
from omni.engine.resample import (
    ALAW_TO_PCM16,
    ULAW_TO_PCM16,
    StreamResampler,
    alaw_decode,
    alaw_encode,
    ulaw_decode,
    ulaw_encode,
)

SR = 16_000
# float32 torch STFT (offline) against float64 numpy (stream)
TOL = 1e-4


def offline(pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid frames, all 30 s of padded frames) as the Qwen2.5-Omni processor computes them."""
    out = qwen_feature_extractor()(
        pcm, sampling_rate=SR, padding="max_length", return_attention_mask=True, return_tensors="np"
    )
    full = out["input_features"][0]
    return full[:, : int(out["attention_mask"].sum())], full


def stream(pcm: np.ndarray, piece: int) -> np.ndarray:
    s = StreamingLogMel()
    parts = [s.push(pcm[i : i + piece]) for i in range(0, len(pcm), piece)]
    parts.append(s.finish())
    return np.concatenate(parts, axis=1)


def clamp_bound_report(streamed: np.ndarray, valid: np.ndarray, full: np.ndarray) -> dict:
    """Checks the bound the running-maximum clamp allows, returns the measured differences.

    Offline x = max(L, M - 8), streamed x = max(L, m_k - 8) with m_k <= M the running max of
    frames 0..k (log10 units; /4 after scaling). So streamed <= offline, they differ only where
    offline sits on its floor, and by at most (M - m_k) / 4.
    """
    assert streamed.shape == valid.shape
    diff = valid - streamed
    assert diff.min() > -TOL, "streamed above offline"
    differs = np.abs(diff) > TOL
    floor = full.max() - 2.0  # (M - 8 + 4) / 4
    assert np.all(np.abs(valid[differs] - floor) < TOL), "a value above the floor differs"
    running = np.maximum.accumulate(streamed.max(axis=0))  # (m_k + 4) / 4
    assert np.all(diff <= (full.max() - running)[None, :] + TOL)
    return {
        "max_abs": float(np.abs(diff).max()),
        "mean_abs": float(np.abs(diff).mean()),
        "frames_differing": float(differs.any(axis=0).mean()),
        "values_differing": float(differs.mean()),
        "frames": valid.shape[1],
    }


def loud_start_clip(n: int) -> np.ndarray:
    """Tones and noise whose loudest frame is frame 0 (a burst in the first window)."""
    rng = np.random.default_rng(0)
    t = np.arange(n) / SR
    x = 0.1 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 2500 * t)
    x += 0.01 * rng.standard_normal(n)
    x[:200] += 0.9 * np.sin(2 * np.pi * 1000 * t[:200])
    return x.astype(np.float32)


@pytest.mark.parametrize("piece", [320, 592, 32_000, None], ids=["20ms", "37ms", "2s", "whole"])
def test_streamed_equals_offline_when_max_comes_first(piece: int | None) -> None:
    pcm = loud_start_clip(5 * SR + 77)  # not a whole number of hops: exercises the tail
    valid, full = offline(pcm)
    assert np.unravel_index(full.argmax(), full.shape)[1] == 0  # precondition
    streamed = stream(pcm, piece or len(pcm))
    assert streamed.shape == valid.shape == (128, 501)
    np.testing.assert_allclose(streamed, valid, atol=TOL, rtol=0)


def test_frames_are_emitted_once_their_window_is_complete() -> None:
    pcm = loud_start_clip(SR)
    s = StreamingLogMel()
    for n in [100, 200, 201, 359, 360, 361, 519, 520, 16_000]:
        s.push(pcm[s.samples_received : n])
        # frame k reads samples up to 160k + 199, and frame 0 reflects sample 200
        expected = 0 if n <= 200 else (n - 200) // 160 + 1
        assert s.frames_emitted == expected, n


def test_output_does_not_depend_on_piece_sizes() -> None:
    pcm = np.random.default_rng(1).standard_normal(3 * SR).astype(np.float32) * 0.1
    reference = stream(pcm, len(pcm))
    for piece in [1, 7, 160, 400, 1000]:
        np.testing.assert_array_equal(stream(pcm, piece), reference)


@pytest.mark.parametrize("n", [1, 100, 159, 160, 161, 200, 201, 360, 1601, 16_000, 32_123])
def test_clip_end_frame_and_token_counts(n: int) -> None:
    pcm = loud_start_clip(n)
    valid, full = offline(pcm)
    streamed = stream(pcm, 97)
    assert streamed.shape[1] == valid.shape[1] == num_frames(n) == -(-n // 160)
    clamp_bound_report(streamed, valid, full)
    # the processor's own token count for this clip
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
        _get_feat_extract_output_lengths,
    )

    assert num_audio_tokens(n) == int(_get_feat_extract_output_lengths(valid.shape[1]))


def test_token_counts() -> None:
    assert [num_audio_tokens(n) for n in (0, 160, 320, 480, SR, 2 * SR)] == [0, 0, 0, 1, 25, 50]


def test_finish_resets_for_the_next_clip() -> None:
    pcm = loud_start_clip(SR)
    s = StreamingLogMel()
    first = np.concatenate([s.push(pcm), s.finish()], axis=1)
    assert s.samples_received == 0 and s.frames_emitted == 0
    second = np.concatenate([s.push(pcm), s.finish()], axis=1)
    np.testing.assert_array_equal(first, second)


def test_dither_is_refused() -> None:
    fe = qwen_feature_extractor()
    fe.dither = 1e-4
    with pytest.raises(ValueError):
        StreamingLogMel(fe)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are not installed (apt-get install espeak-ng sox)")
    d: Path = tmp_path_factory.mktemp("speech")
    raw, wav16 = d / "raw.wav", d / "speech16k.wav"
    text = (
        "Hello, this is a streaming test of the omni call service. "
        "The quick brown fox jumps over the lazy dog, twice."
    )
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav16)], check=True)
    with wave.open(str(wav16)) as w:
        assert w.getframerate() == SR
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


@pytest.mark.parametrize("piece", [320, 592, 32_000], ids=["20ms", "37ms", "2s"])
def test_streamed_speech_stays_within_the_running_max_bound(
    speech: np.ndarray, piece: int
) -> None:
    valid, full = offline(speech)
    report = clamp_bound_report(stream(speech, piece), valid, full)
    print(f"\nespeak-ng {len(speech) / SR:.2f} s, piece {piece}: {report}")
    # espeak starts with digital silence (log10 floor -10, i.e. -1.5 scaled) while the clip's
    # floor is max - 8: the leading frames are where it differs, by at most (M + 10) / 4
    assert report["max_abs"] <= (full.max() * 4 - 4 + 10) / 4 + TOL


# --- resampling ---------------------------------------------------------------------------


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize(
    "in_rate,out_rate", [(8000, 16000), (48000, 16000), (16000, 24000), (24000, 48000)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_resampler_keeps_length_and_pitch(in_rate: int, out_rate: int, dtype: type) -> None:
    scale = 16000 if dtype is np.int16 else 0.5
    pcm = (scale * np.sin(2 * np.pi * 1000 * np.arange(in_rate) / in_rate)).astype(dtype)
    r = StreamResampler(in_rate, out_rate, dtype)
    piece = in_rate // 50  # 20 ms
    parts = [
        r.process(pcm[i : i + piece], last=i + piece >= len(pcm)) for i in range(0, len(pcm), piece)
    ]
    out = np.concatenate(parts)
    assert out.dtype == np.dtype(dtype)
    assert len(out) == out_rate  # one second in, one second out
    assert abs(dominant_hz(out, out_rate) - 1000) <= 1.0


def test_resampler_same_rate_passes_through() -> None:
    pcm = np.arange(10, dtype=np.int16)
    np.testing.assert_array_equal(StreamResampler(16000, 16000, np.int16).process(pcm), pcm)


# --- G.711 --------------------------------------------------------------------------------


def test_g711_known_values() -> None:
    assert ulaw_decode(bytes([0xFF, 0x7F, 0x00, 0x80])).tolist() == [0, 0, -32124, 32124]
    assert alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A])).tolist() == [8, -8, 32256, -32256]
    assert ulaw_encode(np.array([0, -32768, 32767])) == bytes([0xFF, 0x00, 0x80])
    assert alaw_encode(np.array([0, -1, 32767, -32768])) == bytes([0xD5, 0x55, 0xAA, 0x2A])


def test_g711_round_trip() -> None:
    codes = np.arange(256, dtype=np.uint8)
    # every code survives decode -> encode, except mu-law's negative zero (0x7F -> 0 -> 0xFF)
    back = np.frombuffer(ulaw_encode(ULAW_TO_PCM16), dtype=np.uint8)
    assert np.flatnonzero(back != codes).tolist() == [0x7F]
    assert np.array_equal(np.frombuffer(alaw_encode(ALAW_TO_PCM16), dtype=np.uint8), codes)
    # all of int16: decoding is monotonic and within one quantisation step (clipping aside)
    pcm = np.arange(-32768, 32768)
    cases = [(ulaw_encode, ulaw_decode, 644), (alaw_encode, alaw_decode, 512)]
    for encode, decode, max_err in cases:
        y = decode(encode(pcm)).astype(np.int64)
        assert np.all(np.diff(y) >= 0)
        assert np.abs(y - pcm).max() <= max_err
