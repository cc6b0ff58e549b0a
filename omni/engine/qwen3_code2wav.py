"""Qwen3-Omni's Code2Wav decoding replies frame by frame as the talker produces them.

It calls the model's own Code2Wav module (transformers' `Qwen3OmniMoeCode2Wav.forward`) on a
bounded window of frames; what is streaming-specific is which samples of each window are
final, and how many frames of context make them equal to the whole-reply decode.

Batching, as in omni/engine/token2wav.py: each reply is a `Code2WavStream` that only collects
frames and plans its next window; no model runs there. `Code2WavBatch.decode_ready()` decodes
at most one window per stream, windows of equal frame count stacked into one Code2Wav call.
Steady-state windows all have left context + chunk frames, so busy replies share one call.
Shorter windows (a reply's first ones, before it has the context) go in calls of their own,
not padded: Code2Wav is causal, so right padding should leave a window's final samples alone
(measured once: equal to 3e-5 of the peak on the tiny checkpoint), but no test holds that here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omni.engine.token2wav import check_streams, group_rows

# frames beyond Code2Wav's attention reach that its convolutions still see (its kernel-7 and
# dilated convolutions span a few frames; 8 holds on the tiny layout, checked by the test)
CONV_CONTEXT_FRAMES = 8


@dataclass
class AudioChunk:
    start_sample: int
    samples: torch.Tensor  # (n,) float32 at 24 kHz


@dataclass(frozen=True)
class _Window:
    """Frames [lo, hi) of a reply, ready to decode."""

    lo: int
    hi: int
    codes: torch.Tensor  # (16, hi - lo) long, on the CPU

    @property
    def frames(self) -> int:
        return self.hi - self.lo


def exact_left_context(code2wav: torch.nn.Module) -> int:
    """Frames of left context after which a frame no longer changes Code2Wav's output."""
    config = code2wav.config
    return config.num_hidden_layers * (config.sliding_window - 1) + CONV_CONTEXT_FRAMES


class Code2WavBatch:
    """Code2Wav over growing lists of frames (`Code2WavStream`s), emitting only samples the
    whole decode agrees on.

    Code2Wav is causal except for its transposed convolutions: each one's last input step only
    completes with the next step, so a decode of n frames ends `lookahead` samples short of
    n * samples_per_frame (measured from the module, like generate() does: 555 samples, under
    one frame, at the real upsampling layout, which the tiny config keeps). A reply's first
    window ends at its first frame, later ones every `chunk_frames` frames (after finish(): at
    its last frame); each covers up to left_context_frames + chunk_frames frames ending there,
    and emits from where the previous one stopped to its own exact end. After the last frame
    the stream has exactly as many samples as one decode of the whole reply (which is
    generate()'s decode for replies up to its 300-frame chunk; longer ones it decodes in chunks
    with 25 frames of left context, which is itself not the whole-reply decode).

    Every Code2Wav layer attends over a sliding window of frames, so a frame reaches
    layers * (window - 1) frames ahead, plus a few through the convolutions: with
    `exact_left_context()` frames of context the stream equals the whole-reply decode to float
    rounding (max abs difference ~4e-9 of a 0.007 peak with tests/test_qwen3_stream.py's weights;
    ~3e-5 of a full-scale peak with the tiny checkpoint's, 3e-8 with them in float64: the
    float32 cast of the samples; omni/bench/qwen3.py's WAV_TOLERANCE); a shorter
    context is cheaper per frame but not exact (random weights attend evenly, so there the
    error is as large as the signal). transformers' default layout (8 layers, window 72)
    needs 576 frames.

    Single-threaded: the caller cancels a reply by dropping its stream between calls.
    """

    def __init__(
        self,
        code2wav: torch.nn.Module,
        left_context_frames: int | None = None,
        chunk_frames: int = 4,
    ) -> None:
        self.code2wav = code2wav
        if left_context_frames is None:
            left_context_frames = exact_left_context(code2wav)
        self.device = next(code2wav.parameters()).device
        self.num_quantizers = code2wav.config.num_quantizers
        self.codebook_size = code2wav.config.codebook_size
        self.samples_per_frame = int(code2wav.total_upsample)
        self.lookahead = self._lookahead()
        min_context = -(-self.lookahead // self.samples_per_frame)
        if left_context_frames < min_context:
            raise ValueError(
                f"left_context_frames must be at least {min_context} (Code2Wav's lookahead), "
                f"got {left_context_frames}"
            )
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        self.left_context_frames = left_context_frames
        self.chunk_frames = chunk_frames

    @torch.inference_mode()
    def _lookahead(self) -> int:
        frames = 4
        codes = torch.zeros(1, self.num_quantizers, frames, dtype=torch.long, device=self.device)
        return frames * self.samples_per_frame - self.code2wav(codes).shape[-1]

    def stream(self) -> Code2WavStream:
        """A new reply (Code2Wav has no voice input and no noise)."""
        return Code2WavStream(self)

    @torch.inference_mode()
    def decode_ready(self, streams: Sequence[Code2WavStream]) -> list[np.ndarray | None]:
        """Decode at most one ready window of each stream; returns, per stream, the samples that
        became final (float32 mono, 24 kHz) or None where no window was ready."""
        check_streams(self, streams)
        windows = {i: w for i, s in enumerate(streams) if (w := s._next_window()) is not None}
        wavs: dict[int, np.ndarray] = {}
        for rows in group_rows(windows, lambda i: windows[i].frames):
            codes = torch.stack([windows[i].codes for i in rows]).to(self.device)
            wav = self.code2wav(codes)  # (B, 1, samples)
            wavs.update(zip(rows, wav.reshape(len(rows), -1).float().cpu().numpy()))
        return [
            streams[i]._emit(windows[i], wavs[i]) if i in windows else None
            for i in range(len(streams))
        ]

    def ready_chunks(self, stream: Code2WavStream) -> Iterator[AudioChunk]:
        """Decode every ready window of one stream, as a batch of one (the in-process streamer)."""
        while stream.has_ready_chunk:
            start = stream.samples_emitted
            (wav,) = self.decode_ready([stream])
            if wav is not None and wav.size:
                yield AudioChunk(start, torch.from_numpy(wav))


class Code2WavStream:
    """One reply's frames and decoding state; `Code2WavBatch.decode_ready()` decodes it.

    `add()` frames as they come, `finish()` after the last one; the audio returned by the
    decodes totals exactly the whole-reply decode's samples. `done` says all of it was returned.
    """

    def __init__(self, batch: Code2WavBatch) -> None:
        self.batch = batch
        # the frames a coming window may still cover, flat (16 codes a frame), from frame _first
        self._codes: list[int] = []
        self._first = 0
        self.frames = 0  # frames added
        self._decoded = 0  # frames up to the end of the last decoded window
        self.samples_emitted = 0
        self._finished = False

    @property
    def has_ready_chunk(self) -> bool:
        return self._next_end() is not None

    @property
    def done(self) -> bool:
        """finish() was called and every frame's audio has been returned."""
        return self._finished and self._decoded == self.frames

    def add(self, codes: Sequence[int]) -> None:
        """Add whole frames: each frame's codebooks 0..15, frame after frame; nothing is
        decoded here."""
        if self._finished:
            raise RuntimeError("finish() was called; this reply takes no more frames")
        batch = self.batch
        if len(codes) % batch.num_quantizers:
            raise ValueError(
                f"codes must be whole frames of {batch.num_quantizers}, got {len(codes)}"
            )
        bad = [c for c in codes if not 0 <= c < batch.codebook_size]
        if bad:
            raise ValueError(
                f"codes out of Code2Wav's range 0..{batch.codebook_size - 1}: {bad[:5]}"
            )
        self._codes.extend(int(c) for c in codes)
        self.frames += len(codes) // batch.num_quantizers

    def finish(self) -> None:
        """No more frames: the next decodes take the rest, ending at the last frame."""
        self._finished = True

    def _next_end(self) -> int | None:
        """The frame where the next decodable window ends, or None."""
        # the first window is the first frame (first audio as early as it can be); later ones
        # come every chunk_frames, since each re-decodes its left context
        end = self._decoded + (self.batch.chunk_frames if self._decoded else 1)
        if self.frames >= end:
            return end
        return self.frames if self._finished and self.frames > self._decoded else None

    def _next_window(self) -> _Window | None:
        hi = self._next_end()
        if hi is None:
            return None
        batch = self.batch
        # a last window short of chunk_frames takes more context: the steady-state length
        lo = max(0, hi - batch.left_context_frames - batch.chunk_frames)
        q = batch.num_quantizers
        flat = self._codes[(lo - self._first) * q : (hi - self._first) * q]
        return _Window(lo, hi, torch.tensor(flat).view(hi - lo, q).T)

    def _emit(self, window: _Window, wav: np.ndarray) -> np.ndarray:
        """Cut this window's newly final samples and move the state on."""
        first_sample = window.lo * self.batch.samples_per_frame  # reply sample index of wav[0]
        pcm = wav[self.samples_emitted - first_sample :]
        self.samples_emitted += pcm.size
        self._decoded = window.hi
        # later windows start at or after hi + 1 - left context - chunk: forget what is before
        keep = max(0, window.hi + 1 - self.batch.left_context_frames - self.batch.chunk_frames)
        del self._codes[: (keep - self._first) * self.batch.num_quantizers]
        self._first = keep
        return pcm
