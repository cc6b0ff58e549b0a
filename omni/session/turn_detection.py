"""semantic_vad's policy: how long a pause must last, given how finished the turn sounds.

OpenAI's semantic_vad waits for a pause that ends a thought: at most 8 s (low), 4 s (medium)
or 2 s (high); `auto` is medium. Here, when Silero VAD reports a pause within speech, the
prosodic scorer (end_of_turn.py) gives p, the chance the turn ended, and the turn ends once
the silence since the pause began reaches `wait_ms(p, eagerness)`: the eagerness's longest
wait when p is 0, shrinking as p rises to `FLOOR_MS` at p = 1. Speech before then cancels the
end. Eagerness keeps OpenAI's meaning: high ends turns sooner, low lets the caller think.
"""

from __future__ import annotations

from typing import Literal

Eagerness = Literal["low", "medium", "high", "auto"]

MAX_WAIT_MS: dict[Eagerness, int] = {"low": 8000, "medium": 4000, "high": 2000, "auto": 4000}
FLOOR_MS = 250  # even a turn that sounds finished gets this much silence to prove it
# the wait falls off as (1 - p) ** CURVE: a fairly sure end (p = 0.9) waits near the floor
CURVE = 2


def max_wait_ms(eagerness: Eagerness) -> int:
    """The longest silence semantic_vad waits at this eagerness (OpenAI's documented wait)."""
    return MAX_WAIT_MS[eagerness]


def wait_ms(p: float, eagerness: Eagerness) -> int:
    """Silence after which a pause ends the turn, for p(end of turn) in [0, 1]."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], not {p}")
    longest = MAX_WAIT_MS[eagerness]
    return round(FLOOR_MS + (longest - FLOOR_MS) * (1.0 - p) ** CURVE)
