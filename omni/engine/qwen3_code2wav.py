"""Qwen3-Omni's Code2Wav decoding replies frame by frame as the talker produces them.

transformers' `Qwen3OmniMoeCode2Wav.forward` is a pre-transformer over the frames (sliding
window attention, causal) followed by causal upsampling convolutions. Streaming runs the two
halves separately, on the module's own layers:

- the pre-transformer goes over each new frame once, with a per-reply sliding-window KV cache
  (transformers' DynamicCache), so its states equal the whole-reply decode's and no left
  context is ever re-run through it;
- the convolutions decode a window of those states: the new frames plus `left_context_frames`
  before them (by default how far the causal and transposed convolutions reach back, plus the
  lookahead: 10 frames at the real upsampling layout), and only the samples past that context
  are emitted.

Re-decoding the transformer's whole reach instead (layers * (window - 1) frames, 568 at the
real 8 layers and 72-frame window) would cost ~40x the frames per 4-frame chunk.

Batching, as in omni/engine/token2wav.py: each reply is a `Code2WavStream` that collects
frames, holds its pre-transformer cache and plans its next window; it runs no model when frames
are added. `Code2WavBatch.decode_ready()` decodes at most one window per stream: the
pre-transformer per reply (the cache is the reply's; a few frames a call), the convolutions
(the cost) with windows of equal frame count stacked into one call. Steady-state windows all have left context + chunk frames, so busy replies share one
call. Shorter windows (a reply's first ones) go in calls of their own, not padded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from omni.engine.token2wav import check_streams, group_rows

@dataclass
class AudioChunk:
    start_sample: int
    samples: torch.Tensor  # (n,) float32 at 24 kHz


@dataclass(frozen=True)
class _Window:
    """Frames [lo, hi) of a reply, ready to decode: its pre-transformer states."""

    lo: int
    hi: int
    states: torch.Tensor  # (hidden, hi - lo), on the model's device

    @property
    def frames(self) -> int:
        return self.hi - self.lo


def conv_reach_frames(code2wav: nn.Module) -> float:
    """How far back, in frames, Code2Wav's convolutions reach, from their kernels, dilations and
    strides: each causal convolution looks (kernel - 1) * dilation steps back, a transposed one
    ceil(kernel / stride) - 1 of its inputs, each step in frames at the rate it runs at (9.38
    frames at the real upsampling layout)."""
    reach, steps_per_frame = 0.0, 1
    for module in chain(code2wav.upsample.modules(), code2wav.decoder.modules()):
        if isinstance(module, nn.ConvTranspose1d):
            stride = module.stride[0]
            reach += (math.ceil(module.kernel_size[0] / stride) - 1) / steps_per_frame
            steps_per_frame *= stride
        elif isinstance(module, nn.Conv1d):
            reach += (module.kernel_size[0] - 1) * module.dilation[0] / steps_per_frame
    return reach


class Code2WavBatch:
    """Code2Wav over growing lists of frames (`Code2WavStream`s), emitting only samples the
    whole decode agrees on.

    Code2Wav is causal except for its transposed convolutions: each one's last input step only
    completes with the next step, so a decode of n frames ends `lookahead` samples short of
    n * samples_per_frame (measured from the module, like generate() does: 555 samples, under
    one frame, at the real upsampling layout, which the tiny config keeps). A reply's first
    window ends at its first frame, later ones every `chunk_frames` frames (after finish(): at
    its last frame); each covers up to left_context_frames + chunk_frames frames of states
    ending there, and emits from where the previous one stopped to its own exact end. After the
    last frame the stream has exactly as many samples as one decode of the whole reply (which
    is generate()'s decode for replies up to its 300-frame chunk; longer ones it decodes in
    chunks with 25 frames of left context, which is itself not the whole-reply decode), equal
    to it to float rounding (~3e-5 of a full-scale peak with the tiny checkpoint's weights:
    omni/bench/qwen3.py's WAV_TOLERANCE).

    Single-threaded: the caller cancels a reply by dropping its stream between calls.
    """

    def __init__(
        self,
        code2wav: torch.nn.Module,
        left_context_frames: int | None = None,  # None: the least that is exact
        chunk_frames: int = 4,
    ) -> None:
        self.code2wav = code2wav
        self.device = next(code2wav.parameters()).device
        self.num_quantizers = code2wav.config.num_quantizers
        self.codebook_size = code2wav.config.codebook_size
        self.samples_per_frame = int(code2wav.total_upsample)
        self.lookahead = self._lookahead()
        if left_context_frames is None:
            # a frame before the window reaches reach frames past its own end; the samples
            # emitted start `lookahead` before the window's context ends
            reach = conv_reach_frames(code2wav)
            left_context_frames = math.ceil(reach + self.lookahead / self.samples_per_frame)
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
            states = torch.stack([windows[i].states for i in rows])
            wav = self._convolve(states)  # (B, 1, samples)
            wavs.update(zip(rows, wav.reshape(len(rows), -1).float().cpu().numpy()))
        return [
            streams[i]._emit(windows[i], wavs[i]) if i in windows else None
            for i in range(len(streams))
        ]

    def _transform(self, codes: torch.Tensor, cache: DynamicCache, start: int) -> torch.Tensor:
        """The pre-transformer's states (hidden, n) of frames [start, start + n), codes (16, n),
        after the frames before them (in `cache`): the first half of Code2Wav's forward."""
        code2wav = self.code2wav
        codes = codes.to(self.device).unsqueeze(0)
        embeds = code2wav.code_embedding(codes + code2wav.code_offset).mean(1)
        positions = torch.arange(start, start + codes.shape[-1], device=self.device)
        out = code2wav.pre_transformer(
            inputs_embeds=embeds, position_ids=positions.unsqueeze(0), cache=cache, use_cache=True
        )
        return out.last_hidden_state[0].T

    def _convolve(self, states: torch.Tensor) -> torch.Tensor:
        """(B, hidden, frames) states to (B, 1, samples): the second half of Code2Wav's forward."""
        hidden = states
        for blocks in self.code2wav.upsample:
            for block in blocks:
                hidden = block(hidden)
        for block in self.code2wav.decoder:
            hidden = block(hidden)
        return hidden.clamp(min=-1, max=1)

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
        self._codes: list[int] = []  # frames not yet through the pre-transformer, flat
        self._cache: DynamicCache | None = None  # the pre-transformer's, bounded by its window
        self._transformed = 0  # frames through the pre-transformer
        self._states: torch.Tensor | None = None  # theirs a coming window may still cover
        self._states_first = 0  # the frame of _states[:, 0]
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
        """The next window, its new frames run through the pre-transformer; None if none."""
        hi = self._next_end()
        if hi is None:
            return None
        batch = self.batch
        new = hi - self._transformed
        if new:
            q = batch.num_quantizers
            codes = torch.tensor(self._codes[: new * q]).view(new, q).T
            del self._codes[: new * q]
            if self._cache is None:
                self._cache = DynamicCache(config=batch.code2wav.config)
            states = batch._transform(codes, self._cache, self._transformed)
            if self._states is not None:
                states = torch.cat([self._states, states], dim=1)
            self._states, self._transformed = states, hi
        # a last window short of chunk_frames takes more context: the steady-state length
        lo = max(0, hi - batch.left_context_frames - batch.chunk_frames)
        start = lo - self._states_first
        return _Window(lo, hi, self._states[:, start : hi - self._states_first])

    def _emit(self, window: _Window, wav: np.ndarray) -> np.ndarray:
        """Cut this window's newly final samples and move the state on."""
        first_sample = window.lo * self.batch.samples_per_frame  # reply sample index of wav[0]
        pcm = wav[self.samples_emitted - first_sample :]
        self.samples_emitted += pcm.size
        self._decoded = window.hi
        # later windows start at or after hi + 1 - left context - chunk: forget what is before
        keep = max(0, window.hi + 1 - self.batch.left_context_frames - self.batch.chunk_frames)
        self._states = self._states[:, keep - self._states_first :]
        self._states_first = keep
        return pcm
