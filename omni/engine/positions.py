"""TMRoPE positions for a conversation that grows piece by piece.

transformers' `get_rope_index` computes (temporal, height, width) positions for a whole
sequence at once. Every piece it places starts at the previous maximum + 1, so the same
positions can be produced incrementally: text and audio advance one position per token,
an image spreads over its patch grid, and audio inside a video is interleaved with the
frames (Qwen2.5-Omni: in 2-second chunks; Qwen3-Omni: each grid step before the audio token
at its start time, thinker.py). The equality with `get_rope_index` is tested.
"""

from __future__ import annotations

import math

import torch

POSITIONS_PER_SECOND = 25  # Qwen2.5-Omni: one audio token is 40 ms (Qwen3-Omni's config: 13)
SECONDS_PER_CHUNK = 2


class PositionTracker:
    def __init__(self, spatial_merge_size: int = 2) -> None:
        self.merge = spatial_merge_size
        self.next = 0  # the position the next piece starts at (previous max + 1)

    def sequential(self, n: int) -> torch.Tensor:
        """Text or audio tokens: one position each, the same on all three axes."""
        pos = torch.arange(self.next, self.next + n).view(1, -1).expand(3, -1)
        self.next += n
        return pos

    def repeat_last(self, n: int) -> torch.Tensor:
        """Tokens that share one position (the paired vision/audio bos and eos of a video with audio)."""
        pos = torch.full((3, n), self.next)
        self.next += 1
        return pos

    def vision(self, grid_thw: tuple[int, int, int], seconds_per_grid: float = 0.0) -> torch.Tensor:
        """An image (t = 1) or a whole video: positions over its merged patch grid."""
        t, h, w = grid_thw
        pos = self.vision_grid(t, h, w, seconds_per_grid, start=self.next, first_t=0)
        self.next = int(pos.max()) + 1
        return pos

    def vision_grid(
        self,
        t: int,
        h: int,
        w: int,
        seconds_per_grid: float,
        start: int,
        first_t: int,
        per_second: float = POSITIONS_PER_SECOND,
    ) -> torch.Tensor:
        """Positions of temporal grid steps first_t..first_t+t-1 of a vision item starting at `start`."""
        gh, gw = h // self.merge, w // self.merge
        t_idx = (torch.arange(first_t, first_t + t) * seconds_per_grid * per_second).long()
        t_pos = t_idx.view(-1, 1).expand(-1, gh * gw).flatten()
        h_pos = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten()
        w_pos = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten()
        return torch.stack([t_pos, h_pos, w_pos]) + start


class AudioVideoChunker:
    """Positions for a live video with its audio: the audio one position per token from
    `start`, each video grid step at its start time (`per_second` positions a second). Which
    goes first in the sequence is the caller's (thinker.py, per family); this keeps the counts.

    `start` is the position right after the paired <|vision_bos|><|audio_bos|>.
    """

    def __init__(
        self, tracker: PositionTracker, seconds_per_grid: float, per_second: float = POSITIONS_PER_SECOND
    ) -> None:
        self.tracker = tracker
        self.start = tracker.next
        self.seconds_per_grid = seconds_per_grid
        self.per_second = per_second
        self.grids_done = 0
        self.audio_done = 0
        # get_rope_index continues after the max of the *last* piece placed, not the overall max
        self.last_piece_max = self.start - 1

    def video(self, t: int, h: int, w: int) -> torch.Tensor:
        pos = self.tracker.vision_grid(
            t, h, w, self.seconds_per_grid, self.start, self.grids_done, self.per_second
        )
        self.grids_done += t
        if t:
            self.last_piece_max = int(pos.max())
        return pos

    def audio(self, n: int) -> torch.Tensor:
        pos = torch.arange(self.start + self.audio_done, self.start + self.audio_done + n)
        self.audio_done += n
        if n:
            self.last_piece_max = int(pos[-1])
        return pos.view(1, -1).expand(3, -1)

    def grid_audio_index(self, grid: int) -> int:
        """The audio token at grid step `grid`'s start time (its temporal position)."""
        return math.ceil(grid * self.seconds_per_grid * self.per_second)

    def close(self) -> None:
        self.tracker.next = self.last_piece_max + 1
