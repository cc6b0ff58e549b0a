"""A session's context budget: what each range of the thinker's context is, and what goes first.

The thinker keeps a ledger of its context: one `Span` per piece it queued (a text run, a
2-second audio chunk, one video grid step, an image), with the exchange it belongs to (an
exchange is a user turn and the reply to it, numbered as the engine's replay log numbers its
turns), its token range and its TMRoPE positions. When the context reaches its budget the
oldest content goes first by kind: old video frames and images, then old audio, then old
words (whole exchanges, so what stays is still well-formed chat). Never evicted: system turns
(the instructions and the model's speech prompt), the current exchange, and the one before it
unless nothing else would make room (the last `KEEP_LAST_EXCHANGES` exchanges). Input that does
not fit even so ends its reply with context_length_exceeded, and its whole exchange is forgotten
(ThinkerConversation.drop_exchange).

Two ways to drop content, and what each is compared with recomputing the retained content
from scratch:

- eviction (`choose_evictions`, then the KV slot is compacted in place): the keys that stay
  keep their rotary positions, so attention over them is exactly attention over those keys;
  what is approximate is that keys and values of tokens *after* an evicted range were
  computed while that range was visible, so traces of it remain in them;
- recompute (`position_map` closes the gaps in the position axis, then every retained token
  is prefilled again): exact for the retained content at its new positions, at the price of a
  prefill of the whole context. The thinker does this only when positions would pass the
  model's trained range (eviction frees tokens, not positions).

The README's "Context budget" section has the measured difference on the tiny checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni.engine.api import Truncation

# the caller's current exchange and the one before it: the next reply answers the current
# one, and the last reply with what prompted it is what a follow-up most often refers to
KEEP_LAST_EXCHANGES = 2
TIERS = {"video": 0, "image": 0, "audio": 1, "text": 2}  # evicted in this order


@dataclass(eq=False)
class Span:
    kind: str  # "system" | "text" | "audio" | "video" | "image"
    exchange: int
    start: int  # token index in the conversation
    end: int
    positions: torch.Tensor  # (3, n) TMRoPE positions, on the CPU
    embeds: torch.Tensor | None = None  # audio/vision input embeddings, for a recompute
    deepstack: torch.Tensor | None = None  # (layers, n, E) Qwen3-Omni image features, too

    @property
    def size(self) -> int:
        return self.end - self.start


def choose_evictions(
    spans: list[Span], cached: int, exchange: int, need: int, truncation: Truncation
) -> list[Span]:
    """The spans to evict, in order, to free at least `need` tokens (retention_ratio: at
    least the share it drops); fewer when not enough is evictable. Only spans wholly in the
    cache are candidates (queued rows have not run yet). When the older exchanges are not
    enough, the exchange before the current one goes too, media first: else a call whose
    last two exchanges fill the budget could never take another turn."""
    chosen = _choose(spans, cached, exchange - KEEP_LAST_EXCHANGES, need, truncation)
    freed = sum(s.size for s in chosen)
    if freed < need:  # only what is needed of it, whatever the retention ratio
        previous = exchange - 1
        last = _choose(spans, cached, previous, need - freed, Truncation(), after=previous - 1)
        chosen = sorted(chosen + last, key=lambda s: s.start)
    return chosen


def _choose(
    spans: list[Span],
    cached: int,
    newest: int,
    need: int,
    truncation: Truncation,
    after: int | None = None,
) -> list[Span]:
    """`choose_evictions` over the exchanges up to `newest` (and past `after`)."""
    candidates = [
        s
        for s in spans
        if s.kind != "system"
        and s.exchange <= newest
        and (after is None or s.exchange > after)
        and s.end <= cached
    ]
    total = sum(s.size for s in candidates)
    if truncation.mode == "retention_ratio":
        need = max(need, total - int(truncation.retention_ratio * total))
    units: list[list[Span]] = [[s] for s in candidates if TIERS[s.kind] == 0]
    units += [[s] for s in candidates if TIERS[s.kind] == 1]
    by_exchange: dict[int, list[Span]] = {}
    for s in candidates:  # words go a whole exchange at a time (what is left of it)
        if TIERS[s.kind] == 2:
            by_exchange.setdefault(s.exchange, []).append(s)
    units += list(by_exchange.values())
    chosen: list[Span] = []
    freed = 0
    for unit in units:
        if freed >= need:
            break
        chosen += unit
        freed += sum(s.size for s in unit)
    # a later whole-exchange unit may repeat nothing earlier: units are disjoint by kind
    return sorted(chosen, key=lambda s: s.start)


def removed_before(ranges: list[tuple[int, int]], index: int) -> int:
    """How many entries of `ranges` (disjoint) lie below `index`."""
    return sum(max(0, min(end, index) - start) for start, end in ranges if start < index)


def position_map(spans: list[Span], next_position: int) -> torch.Tensor:
    """New position of each old one, up to past the last in use: the position values no span
    uses (freed by evictions) are closed up, keeping every span's own layout (each span is
    taken to cover the whole run from its lowest position to its highest, so it moves as
    one). Index `next_position` gives the new next position (it is not always the last: an
    open video-with-audio span has positions past it)."""
    used = [(int(s.positions.min()), int(s.positions.max())) for s in spans if s.size]
    size = max([next_position, *(hi + 1 for _, hi in used)]) + 1
    covered = torch.zeros(size, dtype=torch.bool)
    for lo, hi in used:
        covered[lo : hi + 1] = True
    covered[next_position:] = True  # from the next position on nothing is a hole
    unused = (~covered).long()
    return torch.arange(size) - (torch.cumsum(unused, 0) - unused)
