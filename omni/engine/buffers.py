"""A tensor that grows by appends without copying what it already holds.

A conversation's token ids and the talker's context rows grow for the whole call. Rebuilding
them with `torch.cat` or `torch.tensor(list)` costs time proportional to the call's length on
every step; here an append costs only what is appended (the storage doubles when full), so a
step late in a 30-minute call costs what a step early in it does.
"""

from __future__ import annotations

import torch


class GrowingTensor:
    """Rows of shape `row_shape` appended along dim 0; `view()` is the filled part (no copy)."""

    def __init__(
        self,
        row_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.long,
        device: torch.device | str = "cpu",
        capacity: int = 256,
    ) -> None:
        self._data = torch.empty((max(1, capacity), *row_shape), dtype=dtype, device=device)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def view(self) -> torch.Tensor:
        return self._data[: self._n]

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.to(self._data.device, self._data.dtype)
        need = self._n + rows.shape[0]
        if need > self._data.shape[0]:
            bigger = torch.empty(
                (max(need, 2 * self._data.shape[0]), *self._data.shape[1:]),
                dtype=self._data.dtype,
                device=self._data.device,
            )
            bigger[: self._n] = self._data[: self._n]
            self._data = bigger
        self._data[self._n : need] = rows
        self._n = need

    def truncate(self, n: int) -> None:
        self._n = max(0, min(n, self._n))

    def delete(self, ranges: list[tuple[int, int]]) -> None:
        """Remove rows [start, end) of each range, closing the gaps (the rest keep their order)."""
        ranges = clipped(ranges, self._n)
        if not ranges:
            return
        first = ranges[0][0]
        keep = kept_index(ranges, self._n, self._data.device)
        self._data[first : first + keep.numel()] = self._data.index_select(0, keep)
        self._n = first + keep.numel()


def clipped(ranges: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """`ranges` inside [0, length), non-empty, sorted."""
    return sorted((max(0, a), min(b, length)) for a, b in ranges if min(b, length) > max(0, a))


def kept_index(ranges: list[tuple[int, int]], length: int, device: torch.device) -> torch.Tensor:
    """Indices from the first range's start to `length` that no range covers, in order
    (`ranges` as `clipped` returns them)."""
    keep = torch.ones(length, dtype=torch.bool)
    for a, b in ranges:
        keep[a:b] = False
    keep[: ranges[0][0]] = False
    return keep.nonzero().flatten().to(device)
