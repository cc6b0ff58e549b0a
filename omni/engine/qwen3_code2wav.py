"""Qwen3-Omni's Code2Wav decoding a reply frame by frame as the talker produces it.

It calls the model's own Code2Wav module (transformers' `Qwen3OmniMoeCode2Wav.forward`) on a
bounded window of frames; what is streaming-specific is which samples of each window are
final, and how many frames of context make them equal to the whole-reply decode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

# frames beyond Code2Wav's attention reach that its convolutions still see (its kernel-7 and
# dilated convolutions span a few frames; 8 holds on the tiny layout, checked by the test)
CONV_CONTEXT_FRAMES = 8


@dataclass
class AudioChunk:
    start_sample: int
    samples: torch.Tensor  # (n,) float32 at 24 kHz


def exact_left_context(code2wav: torch.nn.Module) -> int:
    """Frames of left context after which a frame no longer changes Code2Wav's output."""
    config = code2wav.config
    return config.num_hidden_layers * (config.sliding_window - 1) + CONV_CONTEXT_FRAMES


class Code2WavStream:
    """Code2Wav over a growing list of frames, emitting only samples the whole decode agrees on.

    Code2Wav is causal except for its transposed convolutions: each one's last input step only
    completes with the next step, so a decode of n frames ends `lookahead` samples short of
    n * samples_per_frame (measured from the module, like generate() does: 555 samples, under
    one frame, at the real upsampling layout, which the tiny config keeps). The first decode
    runs on the first frame, later ones on every `chunk_frames` new frames; each covers those
    frames and up to `left_context_frames` before them, and emits from where the previous one
    stopped to its own exact end. After the last frame the stream has exactly as many samples
    as one decode of the whole reply (which is generate()'s decode for replies up to its
    300-frame chunk; longer ones it decodes in chunks with 25 frames of left context, which is
    itself not the whole-reply decode).

    Every Code2Wav layer attends over a sliding window of frames, so a frame reaches
    layers * (window - 1) frames ahead, plus a few through the convolutions: with
    `exact_left_context()` frames of context the stream equals the whole-reply decode to float
    rounding (max abs difference ~4e-9 of a 0.007 peak with tests/test_qwen3_stream.py's weights;
    ~3e-5 of a full-scale peak with the tiny checkpoint's, 3e-8 with them in float64: the
    float32 cast of the samples; omni/bench/qwen3.py's WAV_TOLERANCE); a shorter
    context is cheaper per frame but not exact (random weights attend evenly, so there the
    error is as large as the signal). transformers' default layout (8 layers, window 72)
    needs 576 frames.
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
        self.chunk_frames = chunk_frames
        # bounded: the context plus the frames not yet decoded
        self._frames: deque[torch.Tensor] = deque(maxlen=left_context_frames + chunk_frames)
        self._pending = 0
        self.frames = 0
        self.emitted = 0

    @torch.no_grad()
    def _lookahead(self) -> int:
        frames = 4
        device = next(self.code2wav.parameters()).device
        codes = torch.zeros(
            1, self.code2wav.config.num_quantizers, frames, dtype=torch.long, device=device
        )
        return frames * self.samples_per_frame - self.code2wav(codes).shape[-1]

    def push(self, codes: torch.Tensor) -> AudioChunk | None:
        """Add one frame's (16,) codes; returns the newly exact samples, if any."""
        self._frames.append(codes)
        self.frames += 1
        self._pending += 1
        # the first decode runs on the first frame (first audio as early as it can be); later
        # ones every chunk_frames, since each re-decodes its left context
        if self._pending < (self.chunk_frames if self.emitted else 1):
            return None
        return self.flush()

    @torch.no_grad()
    def flush(self) -> AudioChunk | None:
        """Decode the frames pushed so far (call once after the last frame)."""
        if self._pending == 0:
            return None
        self._pending = 0
        window = torch.stack(list(self._frames), dim=-1)[None]  # (1, 16, n)
        first_frame = self.frames - window.shape[-1]
        wav = self.code2wav(window).reshape(-1).float()
        end = first_frame * self.samples_per_frame + wav.shape[-1]
        if end <= self.emitted:
            return None
        chunk = AudioChunk(self.emitted, wav[self.emitted - first_frame * self.samples_per_frame :])
        self.emitted = end
        return chunk
