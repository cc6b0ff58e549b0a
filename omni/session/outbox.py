"""A session's outbox: what it has for its transport, bounded by bytes and by age.

A client that stops reading must not make the server hold its events forever: the transport
waits on a full socket, and the session keeps producing (reply audio comes faster than real
time). So the outbox counts the approximate size of what it holds and remembers when its
oldest entry came; once it holds more than `max_bytes`, or its oldest entry has waited more
than `max_lag_s`, it drops everything, keeps only an error event saying why, and tells its
owner (`on_overflow`), which closes the session with the reason `client_not_reading`. The
transport then sends that error if it still can and closes (WebSocket code 1008).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from omni.session.errors import RealtimeError
from omni.session.outputs import AudioOut, Closed

Output = dict[str, Any] | AudioOut | Closed
CLIENT_NOT_READING = "client_not_reading"


def approx_size(value: object) -> int:
    """Roughly the bytes `value` takes as JSON (strings and audio dominate; the rest is small)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, AudioOut):
        return value.pcm.nbytes * 4 // 3 + 200  # base64 in a delta event
    if isinstance(value, dict):
        return sum(len(k) + 4 + approx_size(v) for k, v in value.items()) + 2
    if isinstance(value, list | tuple):
        return sum(approx_size(v) + 1 for v in value) + 2
    return 8


class Outbox:
    def __init__(
        self, max_bytes: int, max_lag_s: float, on_overflow: Callable[[], None]
    ) -> None:
        self.max_bytes = max_bytes
        self.max_lag_s = max_lag_s
        self._on_overflow = on_overflow
        self._items: deque[tuple[Output, int, float]] = deque()  # (item, size, queued at)
        self._bytes = 0
        self._ready = asyncio.Event()
        self.overflowed = False

    def put_nowait(self, item: Output) -> None:
        """Queue `item`; never blocks. After an overflow only the final `Closed` is kept."""
        if self.overflowed and not isinstance(item, Closed):
            return
        now = time.monotonic()
        size = approx_size(item)
        self._items.append((item, size, now))
        self._bytes += size
        self._ready.set()
        if not self.overflowed and (
            self._bytes > self.max_bytes or now - self._items[0][2] > self.max_lag_s
        ):
            self._overflow()

    async def get(self) -> Output:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item, size, _ = self._items.popleft()
        self._bytes -= size
        return item

    def qsize(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def _overflow(self) -> None:
        held = self._bytes
        self._items.clear()
        self._bytes = 0
        self.overflowed = True
        error = RealtimeError(
            CLIENT_NOT_READING,
            f"the client is not reading: {held} bytes of events waited over "
            f"{self.max_lag_s:g} s or the {self.max_bytes}-byte limit; closing the session",
            type="server_error",
        )
        self._items.append((error.to_event(), 0, time.monotonic()))
        self._ready.set()
        self._on_overflow()
