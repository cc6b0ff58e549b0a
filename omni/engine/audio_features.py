"""Streaming log-mel features for the thinker's audio encoder, computed while the user talks.

The Qwen2.5-Omni processor runs `WhisperFeatureExtractor` (128 mel bins, 25 ms Hann window,
10 ms hop, `padding="max_length"`) over a whole clip. `StreamingLogMel` computes the same
frames from audio that arrives in pieces, so the thinker can prefill a turn before it ends.

What a frame is (offline, for a clip of n samples zero-padded to the extractor's n_samples):
frame k is the power STFT of window [160k - 200, 160k + 200) of the padded clip, where indices
below 0 are reflected (`x[-i] = x[i]`, torch.stft's centre padding); mel (slaney) then
`log10(max(mel, 1e-10))`; the last STFT frame is dropped and the valid frames are the first
ceil(n / 160), which is the processor's `feature_attention_mask.sum()`.

The one difference a stream cannot avoid: offline, every value is clamped to
`max(log_spec) - 8` over the whole clip. A stream does not know the clip's maximum yet, so
frame k is clamped with the running maximum of frames 0..k. Since that running maximum is
never above the clip's, streamed values are never above offline ones, and they differ only
where the offline value sits on the clip's floor (`max - 8`); by at most (clip max - running
max) / 4 after scaling. When the loudest frame comes first, the two are equal. Clamping per
frame (not per pushed piece) makes the output independent of how the audio was cut up.
"""

from __future__ import annotations

import numpy as np
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import window_function
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
    _get_feat_extract_output_lengths,
)

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # 10 ms: 100 frames/s
# Whisper's log-mel normalisation: floor 8 (log10 units) below the maximum, then (x + 4) / 4
DYNAMIC_RANGE = 8.0
MEL_FLOOR = 1e-10


def qwen_feature_extractor() -> WhisperFeatureExtractor:
    """The extractor the Qwen2.5-Omni processor uses (its preprocessor_config values)."""
    return WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=SAMPLE_RATE,
        n_fft=400,
        hop_length=HOP_LENGTH,
        return_attention_mask=True,
    )


def num_frames(n_samples: int) -> int:
    """Log-mel frames for a clip of n samples: the processor's feature_attention_mask sum."""
    return -(-n_samples // HOP_LENGTH)


def num_audio_tokens(n_samples: int) -> int:
    """Thinker audio tokens (placeholders in the prompt) for a clip of n samples."""
    return int(_get_feat_extract_output_lengths(num_frames(n_samples)))


class StreamingLogMel:
    """Log-mel frames of a growing clip, each emitted as soon as its window is complete.

    `push` takes float32 16 kHz mono audio in pieces of any size and returns the newly
    completed frames, shape (n_mels, n). `finish` returns the remaining tail frames (the end of
    the clip zero-padded, as `padding="max_length"` does) and readies the object for the next
    clip. Concatenating everything returned equals the offline features of the clip (up to the
    running-maximum clamp, see the module doc) for clips shorter than the extractor's n_samples
    minus half a window; the offline extractor truncates longer clips, a stream does not.
    """

    def __init__(self, extractor: WhisperFeatureExtractor | None = None) -> None:
        fe = extractor if extractor is not None else qwen_feature_extractor()
        if fe.dither != 0.0:
            raise ValueError("dithered features are random; a stream cannot reproduce them")
        self._n_fft: int = fe.n_fft
        self._hop: int = fe.hop_length
        self._half = self._n_fft // 2  # centre padding
        self._window = window_function(self._n_fft, "hann").astype(np.float64)
        self._mel_filters = np.asarray(fe.mel_filters, dtype=np.float64)  # (n_fft//2+1, n_mels)
        self.n_mels: int = self._mel_filters.shape[1]
        self._reset()

    def _reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)  # samples [_buf_start, _n_in)
        self._buf_start = 0
        self._n_in = 0
        self._n_out = 0
        self._running_max = -np.inf

    @property
    def frames_emitted(self) -> int:
        return self._n_out

    @property
    def samples_received(self) -> int:
        return self._n_in

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, pcm])
        self._n_in += pcm.size
        return self._emit(self._complete_frames())

    def finish(self) -> np.ndarray:
        """Tail frames of the clip, then reset for a new clip."""
        end = num_frames(self._n_in)
        if end > self._n_out:
            # the padded clip continues with zeros: extend the buffer over the last window
            need = (end - 1) * self._hop + self._half + 1
            self._buf = np.concatenate(
                [self._buf, np.zeros(max(need - self._n_in, 0), dtype=np.float32)]
            )
        out = self._emit(end)
        self._reset()
        return out

    def _complete_frames(self) -> int:
        """How many frames (from 0) have every sample of their window."""
        # frame k>=1 reads up to sample hop*k + half - 1; frame 0 also reflects sample `half`
        if self._n_in <= self._half:
            return 0
        return (self._n_in - self._half) // self._hop + 1

    def _emit(self, end: int) -> np.ndarray:
        start = self._n_out
        if end <= start:
            return np.zeros((self.n_mels, 0), dtype=np.float32)
        log_spec = self._log_mel(self._windows(start, end))  # (n_mels, end - start)

        # clamp each frame with the maximum seen up to and including it
        maxima = np.maximum.accumulate(np.maximum(log_spec.max(axis=0), self._running_max))
        self._running_max = float(maxima[-1])
        out = (np.maximum(log_spec, maxima - DYNAMIC_RANGE) + 4.0) / 4.0

        self._n_out = end
        # keep only what the next frame's window needs
        keep_from = max(end * self._hop - self._half, 0)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :]
            self._buf_start = keep_from
        return out.astype(np.float32)

    def _windows(self, start: int, end: int) -> np.ndarray:
        """Samples of frames start..end-1, shape (end - start, n_fft), centre-padded."""
        lo = start * self._hop - self._half
        hi = (end - 1) * self._hop + self._half
        idx = np.abs(np.arange(lo, hi))  # reflect indices below 0, like torch.stft(center=True)
        segment = self._buf[idx - self._buf_start]
        frames = np.lib.stride_tricks.sliding_window_view(segment, self._n_fft)
        return frames[:: self._hop]

    def _log_mel(self, frames: np.ndarray) -> np.ndarray:
        power = np.abs(np.fft.rfft(frames * self._window, axis=-1)) ** 2  # (n, n_fft//2+1)
        mel = power @ self._mel_filters
        return np.log10(np.maximum(mel, MEL_FLOOR)).T
