"""A prosodic end-of-utterance score: does the caller's last voiced stretch sound finished?

Spoken turns tend to end with the pitch falling and the voice fading out; a speaker who means
to go on holds or raises the pitch at a pause and stops at full strength. This scorer reads
both from the caller's own audio just before the pause, and the session's policy
(turn_detection.py) adds the third cue, the length of the pause, by waiting less for a turn
that sounds finished.

Why prosody and not a model: it works on every checkpoint, the tiny random one included, adds
no second model to the GPU and runs in about 2 ms on one CPU thread (librosa's YIN). The
thinker's own judgement, or a transcript scored by an end-of-utterance model, needs real
weights, and what they would gain cannot be measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import librosa
import numpy as np

from omni.engine.api import INPUT_SAMPLE_RATE

ANALYSED_S = 1.0  # of audio before the pause: the last voiced stretch is within it
FRAME = 1024  # 64 ms: two periods of the lowest pitch YIN looks for
HOP = 160  # 10 ms
FMIN, FMAX = 60.0, 400.0  # Hz: speaking voices
VOICED_DB = 25.0  # a frame within this much of the loudest counts as voiced
FINAL_FRAMES = 12  # the last 120 ms of voicing: where the pitch has fallen or not
# logistic weights over (final pitch in semitones, final level in dB), fitted once (logistic
# regression) on espeak-ng's renderings of twelve sentences ending with "." against the same
# words ending with "," (continuation); `omni bench turns` measures the result
BIAS, PITCH_WEIGHT, ENERGY_WEIGHT = -5.3, -1.1, -0.19


@dataclass(frozen=True)
class Prosody:
    """The last voiced stretch before a pause: how it ends."""

    final_pitch: float  # semitones of its final 120 ms above its median (negative: fallen)
    energy_drop: float  # dB of its final 100 ms below the loudest frame (negative: faded)

    @property
    def end_probability(self) -> float:
        z = BIAS + PITCH_WEIGHT * self.final_pitch + ENERGY_WEIGHT * self.energy_drop
        return float(1 / (1 + np.exp(-z)))


def prosody(speech: np.ndarray) -> Prosody | None:
    """How the voice ends in `speech` (16 kHz float32 ending where the pause began); None
    when too little of it is voiced to tell."""
    audio = speech[-int(ANALYSED_S * INPUT_SAMPLE_RATE) :]
    if len(audio) < FRAME * 2:
        return None
    f0 = librosa.yin(
        audio, fmin=FMIN, fmax=FMAX, sr=INPUT_SAMPLE_RATE, frame_length=FRAME, hop_length=HOP
    )
    level = librosa.amplitude_to_db(
        librosa.feature.rms(y=audio, frame_length=FRAME, hop_length=HOP)[0], ref=np.max
    )
    frames = min(len(f0), len(level))
    f0, level = f0[:frames], level[:frames]
    # YIN pins unvoiced frames near its search limits; loud frames inside them are voice
    voiced = np.flatnonzero((level > -VOICED_DB) & (f0 > FMIN * 1.05) & (f0 < FMAX * 0.95))
    if len(voiced) < FINAL_FRAMES // 2:
        return None
    semitones = 12 * np.log2(f0[voiced] / np.median(f0[voiced]))
    final_pitch = float(np.median(semitones[-FINAL_FRAMES:]))
    final = level[max(voiced[-1] - 9, 0) : voiced[-1] + 1]
    return Prosody(final_pitch=final_pitch, energy_drop=float(np.mean(final)))


def end_probability(speech: np.ndarray) -> float:
    """p(the turn ended) from the voice before a pause; 0.5 when there is no voice to read."""
    found = prosody(speech)
    return 0.5 if found is None else found.end_probability


def warm_up() -> None:
    """Score a voiced second once: librosa's first YIN call compiles its numba kernels (about
    2 s; 15-20 s when its on-disk cache is cold), which would otherwise delay the first
    semantic_vad pause of the process."""
    t = np.arange(INPUT_SAMPLE_RATE) / INPUT_SAMPLE_RATE
    end_probability((0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32))
