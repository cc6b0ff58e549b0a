"""Camera frames on the audio clock: which frame stands for each instant of a live video.

In a video with audio, TMRoPE gives grid step g the audio seconds [g*S, (g+1)*S) of its span,
S = temporal_patch_size / fps, and its T frames stand for the instants g*S + j*S/T. Frames
that come one by one over a network arrive with jitter, in late bursts, and from a camera
clock that drifts against the microphone's, so taking them in arrival order (T per step) lets
pictures slide away from the words said over them, more the longer the caller talks.

A frame may carry its capture time on the caller's audio clock (seconds after the first audio
sample the session received; the gateway maps the camera's timestamps onto it). Each instant
then gets the stamped frame captured nearest to it among those not more than half a slot
after it (later ones are nearer a later instant); older frames than the one chosen are
dropped, as their instants have passed. When none has come, the last frame is held (a camera
that stalls looks frozen). Frames without a time, or a span whose audio has no time, keep the
arrival order. `worst_offset_s` is how far, at most, a stamped frame's capture was from the
instant it stood for (a held frame counts again at each instant it is held for).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    rgb: np.ndarray  # uint8 HxWx3
    time: float | None  # capture time on the caller's audio clock, seconds; None: unknown


@dataclass
class FrameTimeline:
    """A turn's camera frames waiting for the video steps that will use them.

    Bounded by its caller: frames come at most `video_max_fps` a second for the length of one
    turn (whose media the session caps), and each video step consumes the ones it passes.
    """

    slot_seconds: float  # the time between two frames of the video (1 / fps)
    pending: list[Frame] = field(default_factory=list)  # stamped ones in capture order
    last: Frame | None = None
    worst_offset_s: float = 0.0

    def add(self, frame: Frame) -> None:
        at = len(self.pending)
        if frame.time is not None:  # a frame that overtook earlier ones goes back in place
            while at and (t := self.pending[at - 1].time) is not None and t > frame.time:
                at -= 1
        self.pending.insert(at, frame)

    def take(self, instant: float | None) -> np.ndarray:
        """The frame for `instant` (on the same clock as the frames' times; None: the span's
        audio has no time, so frames go in arrival order)."""
        frame = self._choose(instant)
        if frame.time is not None and instant is not None:
            self.worst_offset_s = max(self.worst_offset_s, abs(frame.time - instant))
        self.last = frame
        return frame.rgb

    def _choose(self, instant: float | None) -> Frame:
        if self.pending and (instant is None or self.pending[0].time is None):
            return self.pending.pop(0)
        if instant is not None:
            horizon = instant + self.slot_seconds / 2
            due = [
                (abs(f.time - instant), i)
                for i, f in enumerate(self.pending)
                if f.time is not None and f.time <= horizon
            ]
            if due:
                best = min(due)[1]
                frame = self.pending[best]
                del self.pending[: best + 1]
                return frame
        if self.last is not None:
            return self.last
        # the span's first instant and no frame near it yet: the earliest there is
        return self.pending.pop(0)
