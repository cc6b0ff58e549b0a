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

Batching: each utterance is a `Token2WavStream` that only collects codes and plans its next
chunk (window codes, noise slice, voice); no model runs there. `Token2WavBatch.decode_ready()`
decodes at most one planned chunk per stream. Windows of equal shape (frame count, ODE step
count, reference mel length) are stacked into one DiT call per ODE evaluation, and BigVGAN
inputs of equal length into one vocoder call. The DiT cannot be padded: its lookahead layer
would see the padding, so unequal shapes go in separate groups. Steady-state chunks of every
stream share one shape, so in a busy talker most streams share a group.

A single chunk covering the whole utterance is transformers' forward exactly, given the same
noise. Noise is drawn on the CPU from the caller's `torch.Generator`, block by block. Normal
draws of a multiple of 16 values concatenate on the CPU generator, so this equals one
`torch.randn` of the whole utterance, which is how transformers' `sample()` draws it.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniToken2WavModel,
    RungeKutta4ODESolver,
)

# Mel frames of final mel before a vocoded chunk (after it comes the one-block tail). The
# measured receptive field is about 20 frames; a whole block keeps the join error at float noise.
VOCODER_CONTEXT = 24
SOLVERS = ("rk4", "euler")


def _check_steps(name: str, steps: object) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(
            f"{name} must be an integer of at least 2 ODE time points (one solver step), "
            f"got {steps!r}"
        )


@dataclass(frozen=True)
class Token2WavOptions:
    # "rk4" is transformers' solver (4 DiT calls per step); "euler" is what Qwen's streaming
    # code uses (1 call per step).
    solver: Literal["rk4", "euler"] = "rk4"
    # ODE time points, as transformers' `sample(num_steps=...)`: 10 points are 9 solver steps
    num_steps: int = 10
    # time points for a reply's first chunk (fewer: sooner first audio); None: `num_steps`
    first_chunk_steps: int | None = None
    guidance_scale: float = 0.5
    sway_coefficient: float | None = -1.0
    # Chunk sizes in codes, in order; the last one repeats. Each one is a multiple of a DiT
    # block (12 codes). A chunk is decoded once one more block of codes (its lookahead) has come.
    chunk_codes: tuple[int, ...] = (12, 24, 48)
    crossfade_samples: int = 240  # 10 ms at 24 kHz

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown ODE solver {self.solver!r}; choose one of {SOLVERS}")
        _check_steps("num_steps", self.num_steps)
        if self.first_chunk_steps is not None:
            _check_steps("first_chunk_steps", self.first_chunk_steps)
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not self.chunk_codes or any(c <= 0 for c in self.chunk_codes):
            raise ValueError(f"chunk sizes must be positive, got {self.chunk_codes}")
        if self.crossfade_samples < 0:
            raise ValueError(f"crossfade_samples must be >= 0, got {self.crossfade_samples}")

    def steps_for(self, chunk_index: int) -> int:
        """ODE time points for the chunk at `chunk_index` of a reply (0: the first)."""
        if chunk_index == 0 and self.first_chunk_steps is not None:
            return self.first_chunk_steps
        return self.num_steps

    def dit_passes(self, steps: int) -> int:
        """DiT forward calls one chunk takes with `steps` time points (each on doubled rows
        when classifier-free guidance is on)."""
        return (steps - 1) * (4 if self.solver == "rk4" else 1)


@dataclass(frozen=True)
class _Window:
    """A chunk a stream is ready to decode: the chunk is mel frames [start, end) of the
    utterance, solved on the DiT window [lo, lo + frames)."""

    start: int
    end: int
    lo: int
    final: bool
    steps: int  # ODE time points
    codes: torch.Tensor  # (1, frames / repeats), on the DiT's device
    noise: torch.Tensor  # (1, frames, mel_dim), on the DiT's device

    @property
    def frames(self) -> int:
        return self.noise.shape[1]


class _Joined(NamedTuple):
    """A solved chunk's mel after the cross-fade, with what BigVGAN sees around it."""

    context: torch.Tensor  # final mel before the chunk (1, mel_dim, <= VOCODER_CONTEXT)
    new: torch.Tensor  # the chunk's final mel
    tail: torch.Tensor  # provisional lookahead mel (empty for the last chunk)

    def vocoder_input(self) -> torch.Tensor:
        return torch.cat([self.context, self.new, self.tail], dim=-1)


class Token2WavBatch:
    """Decodes chunks of many utterances (`Token2WavStream`s) together.

    One instance per model and options; `stream()` makes the per-utterance state and
    `decode_ready()` runs the models. Single-threaded: the caller cancels an utterance by
    dropping its stream (or `reset()`) between calls.
    """

    def __init__(
        self, model: Qwen2_5OmniToken2WavModel, options: Token2WavOptions = Token2WavOptions()
    ) -> None:
        self.dit = model.code2wav_dit_model
        self.vocoder = model.code2wav_bigvgan_model
        if self.dit.training or self.vocoder.training:
            raise ValueError("Token2Wav model is in training mode (dropout on): call model.eval()")
        self.repeats = self.dit.config.repeats
        self.block = self.dit.config.block_size  # frames
        self.mel_dim = self.dit.mel_dim
        self.num_codes = self.dit.text_embed.codec_embed.num_embeddings
        self.hop = math.prod(self.vocoder.config.upsample_rates)
        self.samples_per_code = self.repeats * self.hop
        self.block_codes = self.block // self.repeats
        if any(c % self.block_codes for c in options.chunk_codes):
            raise ValueError(f"chunk sizes must be multiples of {self.block_codes} codes")
        if options.crossfade_samples > VOCODER_CONTEXT * self.hop:
            raise ValueError("crossfade_samples must fit in the vocoder context")
        self.options = options

    @property
    def first_chunk_codes(self) -> int:
        """Codes needed before the first audio: one chunk plus its lookahead."""
        return self.options.chunk_codes[0] + self.block_codes

    def stream(
        self,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> Token2WavStream:
        """A new utterance in the voice (`conditioning` (1, enc_emb_dim), `reference_mel`
        (1, T, mel_dim)), its noise from `generator` (CPU) or a freshly seeded one."""
        return Token2WavStream(self, conditioning, reference_mel, generator)

    @torch.inference_mode()
    def decode_ready(self, streams: Sequence[Token2WavStream]) -> list[np.ndarray | None]:
        """Decode at most one ready chunk of each stream; returns, per stream, the audio that
        became final (float32 mono, 24 kHz) or None where no chunk was ready."""
        check_streams(self, streams)
        windows = {i: w for i, s in enumerate(streams) if (w := s._next_window()) is not None}

        def shape(i: int) -> Hashable:  # rows of one DiT call need equal shapes and steps
            return windows[i].frames, windows[i].steps, streams[i]._reference_mel.shape

        mels: dict[int, torch.Tensor] = {}
        for rows in group_rows(windows, shape):
            mel = self._solve([windows[i] for i in rows], [streams[i] for i in rows])
            mels.update(zip(rows, mel.split(1)))

        joined = {i: streams[i]._join(windows[i], mels[i]) for i in windows}
        inputs = {i: j.vocoder_input() for i, j in joined.items()}
        wavs: dict[int, np.ndarray] = {}
        for rows in group_rows(inputs, lambda i: inputs[i].shape[-1]):
            wav = self.vocoder(torch.cat([inputs[i] for i in rows]))  # clamped, squeezed, on CPU
            wavs.update(zip(rows, wav.reshape(len(rows), -1).numpy()))

        return [
            streams[i]._emit(windows[i], joined[i], wavs[i]) if i in windows else None
            for i in range(len(streams))
        ]

    def _solve(self, windows: list[_Window], streams: list[Token2WavStream]) -> torch.Tensor:
        """Flow-matching ODE from the windows' noise to mel (B, mel_dim, T), as `sample()`,
        for windows of one shape and step count: every DiT call takes all rows at once."""
        options = self.options
        noise = torch.cat([w.noise for w in windows])
        frames = noise.shape[1]
        inputs = {
            "condition_vector": torch.cat([s._reference_mel for s in streams]),
            "speaker_embedding": torch.cat([s._conditioning for s in streams])
            .unsqueeze(1)
            .repeat(1, frames, 1),
            "quantized_code": torch.cat([w.codes for w in windows]),
        }

        def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            if options.guidance_scale < 1e-5:
                return self.dit(hidden_states=x, time_step=t, apply_cfg=False, **inputs)
            # the DiT doubles the rows itself: conditioned, then unconditioned
            guided, unconditioned = self.dit(
                hidden_states=x, time_step=t, apply_cfg=True, **inputs
            ).chunk(2)
            return guided + (guided - unconditioned) * options.guidance_scale

        t = torch.linspace(0, 1, windows[0].steps, device=noise.device, dtype=noise.dtype)
        if options.sway_coefficient is not None:
            t += options.sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
        if options.solver == "rk4":
            x = RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(t)[-1]
        else:
            x = noise
            for t0, t1 in itertools.pairwise(t):
                x = x + (t1 - t0) * velocity(t0, x)
        return x.transpose(1, 2)


class Token2WavStream:
    """One utterance's codes and decoding state; `Token2WavBatch.decode_ready()` decodes it.

    `add()` codes as they come, `finish()` after the last one; the audio returned by the
    decodes totals exactly len(codes) * 480 samples. `done` says all of it was returned.
    """

    def __init__(
        self,
        batch: Token2WavBatch,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        self.batch = batch
        self.reset(conditioning, reference_mel, generator)

    @property
    def codes_added(self) -> int:
        return len(self._codes)

    @property
    def has_ready_chunk(self) -> bool:
        return self._next_chunk_end() is not None

    @property
    def done(self) -> bool:
        """finish() was called and every code's audio has been returned."""
        return self._finished and self._mel_done == len(self._codes) * self.batch.repeats

    def reset(
        self,
        conditioning: torch.Tensor | None = None,
        reference_mel: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Drop the current utterance and get ready for the next.

        The voice is kept unless given. The noise comes from `generator` (CPU), or from a
        freshly seeded one.
        """
        batch = self.batch
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        if conditioning is not None:
            self._conditioning = conditioning.to(batch.dit.device, torch.float32)
        if reference_mel is not None:
            self._reference_mel = reference_mel.to(batch.dit.device, torch.float32)
        self._generator = generator
        self._noise = torch.empty(1, 0, batch.mel_dim)
        self._codes: list[int] = []
        self._chunks_done = 0
        self._mel_done = 0  # final mel frames
        self._mel_context = torch.empty(1, batch.mel_dim, 0)  # last final frames
        self._tail = torch.empty(1, batch.mel_dim, 0)  # provisional lookahead mel
        self._held = np.zeros(0, np.float32)  # samples waiting for the cross-fade
        self._finished = False

    def add(self, codes: Sequence[int]) -> None:
        """Add codes (0..num_embeds); nothing is decoded here."""
        if self._finished:
            raise RuntimeError("finish() was called; reset() before the next utterance")
        bad = [c for c in codes if not 0 <= c < self.batch.num_codes]
        if bad:
            raise ValueError(
                f"codes out of the DiT's range 0..{self.batch.num_codes - 1}: {bad[:5]}"
            )
        self._codes.extend(int(c) for c in codes)

    def finish(self) -> None:
        """No more codes: the next decode takes all codes still pending, without lookahead."""
        self._finished = True

    def _next_chunk_end(self) -> int | None:
        """The code index where the next decodable chunk ends, or None."""
        done = self._mel_done // self.batch.repeats
        if self._finished:  # the last chunk: all that is left
            return len(self._codes) if len(self._codes) > done else None
        sizes = self.batch.options.chunk_codes
        end = done + sizes[min(self._chunks_done, len(sizes) - 1)]
        return end if len(self._codes) >= end + self.batch.block_codes else None

    def _next_window(self) -> _Window | None:
        end_code = self._next_chunk_end()
        if end_code is None:
            return None
        batch = self.batch
        final = self._finished
        start, end = self._mel_done, end_code * batch.repeats
        lo = max(0, start - 2 * batch.block)
        hi = end if final else end + batch.block
        device, r = batch.dit.device, batch.repeats
        return _Window(
            start=start,
            end=end,
            lo=lo,
            final=final,
            steps=batch.options.steps_for(self._chunks_done),
            codes=torch.tensor([self._codes[lo // r : hi // r]], device=device),
            noise=self._noise_until(hi)[:, lo:hi].to(device),
        )

    def _join(self, window: _Window, mel: torch.Tensor) -> _Joined:
        """Cross-fade the previous window's lookahead into this window's estimate (mel)."""
        new = mel[..., window.start - window.lo : window.end - window.lo]
        tail = mel[..., window.end - window.lo :]
        n = min(self._tail.shape[-1], new.shape[-1])
        if n:
            w = torch.arange(1, n + 1, dtype=mel.dtype, device=mel.device) / (n + 1)
            new = torch.cat([self._tail[..., :n] * (1 - w) + new[..., :n] * w, new[..., n:]], -1)
        return _Joined(self._mel_context.to(mel.device), new, tail)

    def _emit(self, window: _Window, joined: _Joined, wav: np.ndarray) -> np.ndarray:
        """Cut this chunk's final samples from its vocoded window and move the state on."""
        hop = self.batch.hop
        start, end = window.start, window.end
        first = (start - joined.context.shape[-1]) * hop  # utterance sample index of wav[0]
        emitted = start * hop - self._held.size  # utterance samples already returned
        stop = end * hop - (0 if window.final else self.batch.options.crossfade_samples)
        pcm = wav[emitted - first : stop - first].astype(np.float32)
        if self._held.size:
            fade = _fade_in(self._held.size)
            pcm[: self._held.size] = self._held * (1 - fade) + pcm[: self._held.size] * fade

        self._mel_done = end
        self._chunks_done += 1
        self._tail = joined.tail
        self._mel_context = torch.cat([joined.context, joined.new], -1)[..., -VOCODER_CONTEXT:]
        self._held = wav[stop - first : end * hop - first].astype(np.float32)
        return pcm

    def _noise_until(self, frames: int) -> torch.Tensor:
        """The utterance's initial noise (1, >= frames, mel_dim) on the CPU, drawn a block at a time."""
        while self._noise.shape[1] < frames:
            block = torch.randn(1, self.batch.block, self.batch.mel_dim, generator=self._generator)
            self._noise = torch.cat([self._noise, block], dim=1)
        return self._noise


def check_streams(batch: object, streams: Sequence) -> None:
    """The streams of one batched decode: each once, and made by `batch`."""
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("a stream appears twice in one decode")
    if any(s.batch is not batch for s in streams):
        raise ValueError(f"a stream belongs to another {type(batch).__name__}")


def group_rows(rows: Iterable[int], key: Callable[[int], Hashable]) -> list[list[int]]:
    """`rows` grouped by `key(row)`: the rows that can share one model call."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return list(groups.values())


def _fade_in(n: int) -> np.ndarray:
    """Raised-cosine weights rising from 0 to 1 over n samples (the fade-out is 1 minus this)."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)
