"""What a session hands its transport, and what a transport with its own playback gives back.

A session's `outbox` yields, in order:
- `dict`: a server event, already in the client's wire shape, to send as JSON;
- `AudioOut`: reply audio. A WebSocket sends it as `response.output_audio.delta` (see
  `RealtimeSession.render_audio`); a WebRTC gateway plays it on its paced track instead;
- `Closed`: the session is over (its cap was reached or it was closed); close the transport.

A transport that plays audio itself (WebRTC) passes a `Playout`, so on barge-in the session
can stop playback and truncate the reply to what the caller actually heard; over WebSocket
the client plays audio and sends `conversation.item.truncate` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class AudioOut:
    response_id: str
    item_id: str
    pcm: np.ndarray  # int16 mono, 24 kHz
    first_sample: int  # offset of pcm[0] within the item's audio


@dataclass(frozen=True)
class Closed:
    reason: str


@dataclass(frozen=True)
class Played:
    """How much of a reply item the caller heard before playback was cleared."""

    response_id: str
    item_id: str
    audio_end_ms: int


class Playout(Protocol):
    def clear(self) -> Played | None:
        """Drop all queued reply audio now; say how far the item being played got (None: idle)."""
