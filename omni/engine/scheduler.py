"""The step scheduler: which sessions run in this step's one forward, and how many tokens each.

Both model workers call it once per loop with what every session has ready:

- decode rows (a thinker reply token, a talker codec step) go first: each is on a caller's
  speech path, and costs one or two tokens;
- then prefill (user audio, camera frames, images, text; the talker's context rows) fills
  the rest of the step's token budget in chunks, urgent prefill (a reply waits for it)
  before background prefill, so a 15 s clip or an image in one call never holds up another
  call's speech, and no step runs long enough to look like a hang.

Within each class sessions take turns (a rotating start), so none is starved by the others.
`max_rows=1` turns batching off: one session per forward, every session in turn, as an
unbatched engine steps them (the benchmarks' baseline).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    key: str
    tokens: int  # tokens ready to run (decode rows: what the step needs, 1 or 2)
    decode: bool = False
    urgent: bool = False  # prefill that a started reply waits for


class StepScheduler:
    def __init__(self, token_budget: int, max_rows: int) -> None:
        if token_budget < 2 or max_rows < 1:
            raise ValueError("a step needs a budget of at least 2 tokens and at least 1 row")
        self.token_budget = token_budget
        self.max_rows = max_rows
        self._turn = 0

    def plan(self, demands: list[Demand]) -> list[tuple[str, int]]:
        """(key, tokens) to run this step, in row order; empty when nothing is ready."""
        demands = [d for d in demands if d.tokens > 0]
        if not demands:
            return []
        self._turn += 1
        if self.max_rows == 1:
            d = _rotated(demands, self._turn)[0]
            return [(d.key, d.tokens if d.decode else min(d.tokens, self.token_budget))]
        plan: list[tuple[str, int]] = []
        budget = self.token_budget
        decodes = [d for d in demands if d.decode]
        urgent = [d for d in demands if not d.decode and d.urgent]
        background = [d for d in demands if not d.decode and not d.urgent]
        for d in _rotated(decodes, self._turn):
            if len(plan) == self.max_rows or d.tokens > budget:
                break
            plan.append((d.key, d.tokens))
            budget -= d.tokens
        for d in _rotated(urgent, self._turn) + _rotated(background, self._turn):
            if len(plan) == self.max_rows or budget == 0:
                break
            n = min(d.tokens, budget)
            plan.append((d.key, n))
            budget -= n
        return plan


def _rotated(items: list[Demand], turn: int) -> list[Demand]:
    if not items:
        return items
    k = turn % len(items)
    return items[k:] + items[:k]
