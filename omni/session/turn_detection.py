"""semantic_vad's eagerness as a silence window: the stand-in until a real end-of-turn signal.

OpenAI's semantic_vad waits for a pause that ends a thought, at most 8 s (low), 4 s (medium)
or 2 s (high); `auto` is medium. This server has no end-of-utterance model yet, so eagerness
picks how long Silero VAD must hear silence before the turn ends: a quarter of OpenAI's
longest wait, so `high` answers as fast as server_vad's 500 ms default and `low` lets the
caller pause for two seconds mid-thought. Replacing this module is how a real semantic end
of turn plugs in; nothing else reads eagerness.
"""

from __future__ import annotations

from typing import Literal

Eagerness = Literal["low", "medium", "high", "auto"]

MAX_WAIT_MS: dict[Eagerness, int] = {"low": 8000, "medium": 4000, "high": 2000, "auto": 4000}


def semantic_silence_ms(eagerness: Eagerness) -> int:
    """The silence window that stands in for semantic_vad at this eagerness."""
    return MAX_WAIT_MS[eagerness] // 4
