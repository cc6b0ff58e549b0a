"""A WebRTC caller's camera frames on their microphone's clock.

The engine places each camera frame by its capture time on the caller's audio clock, in
seconds after the first audio sample the session received (Engine.append_video_frame). Each
decoded aiortc frame has a `pts` in its track's RTP clock (video 90 kHz, audio 48 kHz), which
aiortc counts from that track's first packet; the two tracks' clocks have unrelated origins,
and only RTCP sender reports tie each to the sender's wall clock. aiortc keeps no more of a
sender report than what its receiver reports need (the NTP time's middle bits and when it
came; not its RTP timestamp), so that mapping is not reachable. Instead each track's media
clock is anchored to the gateway's monotonic clock where its frames came soonest (the least
`arrival - media time` so far, at first the first frame's), and carries time on from there:

- exact: the spacing of frames within a track as the sender's clock stamped them, so network
  jitter, bursts and late or reordered arrival do not move a frame;
- approximate: the offset between the two tracks is the difference of their least-delayed
  frames' network and decoding delays (a few tens of ms on a steady path); drift between the
  sender's camera and audio clocks is not removed (a sender report would); and the session's
  audio clock counts the samples it got, so audio lost on the way (or dropped by a session
  that fell behind, inbound.py) shifts later frames by as much.
"""

from __future__ import annotations

import time

from av.frame import Frame


class TrackClock:
    """One track's frames on the gateway's monotonic clock: its media time, anchored where a
    frame came soonest after its media time (a delayed frame does not move the anchor)."""

    def __init__(self) -> None:
        self.offset: float | None = None  # monotonic time minus media time
        self.first_media: float | None = None  # the first frame's media time

    def at(self, frame: Frame, arrived: float) -> float | None:
        """When `frame` began on the monotonic clock; None: it has no media time."""
        if frame.pts is None or frame.time_base is None:
            return None
        media = float(frame.pts * frame.time_base)
        if self.offset is None or arrived - media < self.offset:
            self.offset = arrived - media
        if self.first_media is None:
            self.first_media = media
        return self.offset + media


class CallClock:
    """Maps a call's camera frames onto the time of its audio (the session's sample clock)."""

    def __init__(self) -> None:
        self._audio = TrackClock()
        self._video = TrackClock()
        self._audio_arrival: float | None = None  # of the first microphone frame (no pts)

    def audio_frame(self, frame: Frame, arrived: float | None = None) -> None:
        """A microphone frame, as it is given to the session."""
        arrived = time.monotonic() if arrived is None else arrived
        if self._audio.at(frame, arrived) is None and self._audio_arrival is None:
            self._audio_arrival = arrived

    def video_time(self, frame: Frame, arrived: float | None = None) -> float | None:
        """The camera frame's capture in seconds after the session's first audio sample;
        None before any audio came (the frame then goes by arrival) or without a media time."""
        at = self._video.at(frame, time.monotonic() if arrived is None else arrived)
        if at is None:
            return None
        audio = self._audio
        if audio.offset is not None and audio.first_media is not None:
            return at - (audio.offset + audio.first_media)
        if self._audio_arrival is not None:  # a microphone without media times
            return at - self._audio_arrival
        return None
