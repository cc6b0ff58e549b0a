"""Realtime call sessions: OpenAI-Realtime-compatible call state, independent of transport."""

from omni.session.outputs import AudioOut, Closed, Played, Playout
from omni.session.session import RealtimeSession

__all__ = ["AudioOut", "Closed", "Played", "Playout", "RealtimeSession"]
