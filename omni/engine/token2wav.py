"""Streaming Token2Wav: Qwen2.5-Omni codec codes -> 24 kHz speech while the codes still arrive.

transformers' `Qwen2_5OmniToken2WavModel` turns a whole reply into audio at once: a DiT solves
a flow-matching ODE from noise to an 80-bin mel (2 frames per code), then BigVGAN turns the mel
into samples (240 per frame, so 480 per code). This module runs those same two modules on
pieces of the reply.

DiT: attention works in blocks of `block_size` = 24 frames (12 codes); a layer sees at most one
block back or one block ahead, so a frame depends on 2 blocks back and 1 ahead. Chunk k
(frames [b_k, b_k+1)) is solved on the window [b_k - 2 blocks, b_k+1 + 1 block). Boundaries are
block multiples, so the window's block mask is the utterance's. Its initial noise is cut from
one noise sequence for the whole utterance, so overlapping windows start from the same noise.
The window's last block (the lookahead) comes out without lookahead of its own. It is kept as
a provisional tail, and the next chunk's first block is cross-faded from it into that chunk's
own estimate. So the mel has no step at a chunk boundary.

BigVGAN: it is convolutional, and its receptive field is about 20 frames each way (measured on
the real config: trimming after 20 frames of context differs from the whole-mel output by
2e-7). Each chunk is vocoded with `VOCODER_CONTEXT` frames of final mel on its left and the
provisional tail on its right. The last `crossfade_samples` before the boundary were rendered
against the tail, not the final mel. So they are held back and cross-faded with the next
chunk's rendering of the same samples.

A single chunk covering the whole utterance is transformers' forward exactly, given the same
noise. Noise is drawn on the CPU from the caller's `torch.Generator`, block by block. Normal
draws of a multiple of 16 values concatenate on the CPU generator, so this equals one
`torch.randn` of the whole utterance, which is how transformers' `sample()` draws it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniToken2WavModel,
    RungeKutta4ODESolver,
)

# Mel frames of final mel before a vocoded chunk (after it comes the one-block tail). The
# measured receptive field is about 20 frames; a whole block keeps the join error at float noise.
VOCODER_CONTEXT = 24


@dataclass(frozen=True)
class Token2WavOptions:
    # "rk4" is transformers' solver (4 DiT calls per step); "euler" is what Qwen's streaming
    # code uses (1 call per step).
    solver: Literal["rk4", "euler"] = "rk4"
    num_steps: int = 10  # ODE time points, as in transformers' `sample()`: 10 points, 9 steps
    guidance_scale: float = 0.5
    sway_coefficient: float | None = -1.0
    # Chunk sizes in codes, in order; the last one repeats. Each one is a multiple of a DiT
    # block (12 codes). A chunk is decoded once one more block of codes (its lookahead) has come.
    chunk_codes: tuple[int, ...] = (12, 24, 48)
    crossfade_samples: int = 240  # 10 ms at 24 kHz


class _Cancelled(Exception):
    """Raised inside a decode when `reset()` started a new utterance meanwhile."""


class StreamingToken2Wav:
    """Decodes one utterance at a time from codes pushed in pieces.

    `push()` returns the audio that became final (float32 mono numpy arrays, 24 kHz), and
    `finish()` returns the rest. Their total length is exactly len(codes) * 480 samples.
    `reset()` drops the utterance and may be called from another thread while `push()`
    decodes. The decode then stops at its next DiT call, and its result is discarded.
    """

    def __init__(
        self,
        model: Qwen2_5OmniToken2WavModel,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        options: Token2WavOptions = Token2WavOptions(),
        generator: torch.Generator | None = None,
    ) -> None:
        self._dit = model.code2wav_dit_model
        self._vocoder = model.code2wav_bigvgan_model
        if self._dit.training or self._vocoder.training:
            raise ValueError("Token2Wav model is in training mode (dropout on): call model.eval()")
        dit_config = self._dit.config
        self._repeats = dit_config.repeats
        self._block = dit_config.block_size  # frames
        self._num_codes = self._dit.text_embed.codec_embed.num_embeddings
        self._hop = math.prod(self._vocoder.config.upsample_rates)
        self.samples_per_code = self._repeats * self._hop
        self.block_codes = self._block // self._repeats
        bad = [c for c in options.chunk_codes if c <= 0 or c % self.block_codes]
        if not options.chunk_codes or bad:
            raise ValueError(f"chunk sizes must be positive multiples of {self.block_codes} codes")
        if not 0 <= options.crossfade_samples <= VOCODER_CONTEXT * self._hop:
            raise ValueError("crossfade_samples must fit in the vocoder context")
        if options.solver not in ("rk4", "euler"):
            raise ValueError(f"unknown ODE solver {options.solver!r}")
        self.options = options
        self._lock = threading.Lock()
        self._epoch = 0
        self.reset(conditioning, reference_mel, generator)

    @property
    def first_chunk_codes(self) -> int:
        """Codes needed before `push()` returns the first audio: one chunk plus its lookahead."""
        return self.options.chunk_codes[0] + self.block_codes

    @property
    def codes_pushed(self) -> int:
        return len(self._codes)

    def reset(
        self,
        conditioning: torch.Tensor | None = None,
        reference_mel: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Drop the current utterance (cancelling a decode in flight) and get ready for the next.

        The voice (`conditioning` (1, enc_emb_dim), `reference_mel` (1, T, mel_dim)) is kept
        unless given. The noise comes from `generator` (CPU), or from a freshly seeded one.
        """
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        with self._lock:
            self._epoch += 1
            if conditioning is not None:
                self._conditioning = conditioning.to(self._dit.device, torch.float32)
            if reference_mel is not None:
                self._reference_mel = reference_mel.to(self._dit.device, torch.float32)
            self._generator = generator
            self._noise = torch.empty(1, 0, self._dit.mel_dim)
            self._codes: list[int] = []
            self._chunks_done = 0
            self._mel_done = 0  # final mel frames
            self._mel_context = torch.empty(1, self._dit.mel_dim, 0)  # last final frames
            self._tail = torch.empty(1, self._dit.mel_dim, 0)  # provisional lookahead mel
            self._held = np.zeros(0, np.float32)  # samples waiting for the cross-fade
            self._finished = False

    def push(self, codes: Sequence[int]) -> list[np.ndarray]:
        """Add codes (0..num_embeds); returns the audio chunks that became final, maybe none."""
        with self._lock:
            if self._finished:
                raise RuntimeError("finish() was called; reset() before the next utterance")
            bad = [c for c in codes if not 0 <= c < self._num_codes]
            if bad:
                raise ValueError(
                    f"codes out of the DiT's range 0..{self._num_codes - 1}: {bad[:5]}"
                )
            self._codes.extend(int(c) for c in codes)
            epoch = self._epoch
        chunks = []
        try:
            while (end := self._ready_chunk_end()) is not None:
                chunks.append(self._decode(end, final=False, epoch=epoch))
        except _Cancelled:
            return []
        return chunks

    def finish(self) -> list[np.ndarray]:
        """Decode the codes still pending (no lookahead is needed at the end)."""
        with self._lock:
            self._finished = True
            epoch = self._epoch
            pending = len(self._codes) > self._mel_done // self._repeats
        if not pending:  # no codes at all: after any chunk a block of codes stays pending
            return []
        try:
            return [self._decode(len(self._codes), final=True, epoch=epoch)]
        except _Cancelled:
            return []

    def _ready_chunk_end(self) -> int | None:
        sizes = self.options.chunk_codes
        end = self._mel_done // self._repeats + sizes[min(self._chunks_done, len(sizes) - 1)]
        return end if len(self._codes) >= end + self.block_codes else None

    @torch.inference_mode()
    def _decode(self, end_code: int, final: bool, epoch: int) -> np.ndarray:
        with self._lock:  # read this utterance's state; reset() may replace it meanwhile
            if self._epoch != epoch:
                raise _Cancelled
            start, end = self._mel_done, end_code * self._repeats
            lo = max(0, start - 2 * self._block)
            hi = end if final else end + self._block
            codes = self._codes[lo // self._repeats : hi // self._repeats]
            noise = self._noise_until(hi)[:, lo:hi]
            voice = (self._conditioning, self._reference_mel)
            tail, context, held = self._tail, self._mel_context, self._held

        device = self._dit.device
        mel = self._solve(noise.to(device), torch.tensor([codes], device=device), voice, epoch)
        new, next_tail = mel[..., start - lo : end - lo], mel[..., end - lo :]

        # mel cross-fade from the previous window's lookahead into this window's estimate
        n = min(tail.shape[-1], new.shape[-1])
        if n:
            w = torch.arange(1, n + 1, dtype=mel.dtype, device=device) / (n + 1)
            new = torch.cat([tail[..., :n] * (1 - w) + new[..., :n] * w, new[..., n:]], dim=-1)

        context = context.to(device)
        wav = self._vocoder(torch.cat([context, new, next_tail], dim=-1)).reshape(-1).numpy()
        first = (start - context.shape[-1]) * self._hop  # utterance sample index of wav[0]
        emitted = start * self._hop - held.size  # utterance samples already returned
        stop = end * self._hop - (0 if final else self.options.crossfade_samples)
        pcm = wav[emitted - first : stop - first].astype(np.float32)
        if held.size:
            fade = _fade_in(held.size)
            pcm[: held.size] = held * (1 - fade) + pcm[: held.size] * fade

        with self._lock:
            if self._epoch != epoch:
                raise _Cancelled
            self._mel_done = end
            self._chunks_done += 1
            self._tail = next_tail
            self._mel_context = torch.cat([context, new], dim=-1)[..., -VOCODER_CONTEXT:]
            self._held = wav[stop - first : end * self._hop - first].astype(np.float32)
        return pcm

    def _noise_until(self, frames: int) -> torch.Tensor:
        """The utterance's initial noise (1, >= frames, mel_dim) on the CPU, drawn a block at a time."""
        while self._noise.shape[1] < frames:
            block = torch.randn(1, self._block, self._dit.mel_dim, generator=self._generator)
            self._noise = torch.cat([self._noise, block], dim=1)
        return self._noise

    def _solve(
        self,
        noise: torch.Tensor,
        codes: torch.Tensor,
        voice: tuple[torch.Tensor, torch.Tensor],
        epoch: int,
    ) -> torch.Tensor:
        """Flow-matching ODE from `noise` (1, T, mel_dim) to mel (1, mel_dim, T), as `sample()`."""
        options = self.options
        conditioning, reference_mel = voice
        conditioning = conditioning.unsqueeze(1).repeat(1, noise.shape[1], 1)
        inputs = {
            "condition_vector": reference_mel,
            "speaker_embedding": conditioning,
            "quantized_code": codes,
        }

        def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            if self._epoch != epoch:  # reset() from another thread: stop within one DiT call
                raise _Cancelled
            if options.guidance_scale < 1e-5:
                return self._dit(hidden_states=x, time_step=t, apply_cfg=False, **inputs)
            guided, unconditioned = self._dit(
                hidden_states=x, time_step=t, apply_cfg=True, **inputs
            ).chunk(2)
            return guided + (guided - unconditioned) * options.guidance_scale

        t = torch.linspace(0, 1, options.num_steps, device=noise.device, dtype=conditioning.dtype)
        if options.sway_coefficient is not None:
            t += options.sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
        if options.solver == "rk4":
            x = RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(t)[-1]
        else:
            x = noise
            for t0, t1 in itertools.pairwise(t):
                x = x + (t1 - t0) * velocity(t0, x)
        return x.transpose(1, 2)


def _fade_in(n: int) -> np.ndarray:
    """Raised-cosine weights rising from 0 to 1 over n samples (the fade-out is 1 minus this)."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)
