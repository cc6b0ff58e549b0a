"""A speculative reply: started at the caller's pause, held until their turn is confirmed.

When server VAD reports a pause within speech (`speculative_pause_ms` of silence, shorter
than the turn's silence window), the session closes the engine's turn and starts the reply at
once (thinker decode, talker, Token2Wav), but everything the reply emits, events and audio
alike, goes into this hold instead of the outbox or the WebRTC playout. Then either:

- hit: the VAD's stop comes for the same item; the session commits it, `release()` sends what
  was held, in order, and the rest of the reply streams straight through;
- miss: the caller goes on (a resume), or a client event makes the guess moot (a commit,
  clear, new item, response.create, session.update, close); `discard()` drops what was held
  and everything after, and the session has the engine forget the reply
  (`Engine.discard_reply`), so nothing of it is heard, kept or said in events.

The hold is bounded: at `HELD_MAX` entries the reply's emits wait until the turn is decided
(the engine then holds the rest in its own bounded reply queue). Between a pause and the stop
are only `silence_duration_ms - speculative_pause_ms` (400 ms by default), so a reply rarely
gets near it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from omni.session.engine_queue import TurnInput
from omni.session.outputs import AudioOut
from omni.session.response import Response

HELD_MAX = 2048  # events and audio chunks held before the reply waits for the decision

Held = tuple[Literal["event", "audio"], Any]


class Speculation:
    def __init__(self, item_id: str, pieces: list[TurnInput], response: Response) -> None:
        self.item_id = item_id  # the user item the reply answers, once committed
        self.pieces = pieces  # the turn's input the reply was started on
        self.response = response
        self.state: Literal["held", "released", "discarded"] = "held"
        self._held: list[Held] = []
        self._decided = asyncio.Event()
        self._flushing = asyncio.Lock()  # releases and live emits keep the reply's order
        self._emit: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self._emit_audio: Callable[[AudioOut], Awaitable[None]] | None = None

    # the Response's emit and emit_audio while it runs
    async def emit(self, event: dict[str, Any]) -> None:
        await self._out(("event", event))

    async def emit_audio(self, out: AudioOut) -> None:
        await self._out(("audio", out))

    def release(
        self,
        emit: Callable[[dict[str, Any]], Awaitable[None]],
        emit_audio: Callable[[AudioOut], Awaitable[None]],
    ) -> Awaitable[None]:
        """The turn is confirmed: send what was held, then pass the rest straight through.
        The reply's first audio counts from now, when the caller can first get it."""
        self.state = "released"
        self._emit, self._emit_audio = emit, emit_audio
        if self.response.first_audio_at is not None:
            self.response.first_audio_at = time.monotonic()
        self._decided.set()
        return self._flush()

    async def decided(self) -> None:
        """Until the turn is confirmed or the reply discarded."""
        await self._decided.wait()

    def discard(self) -> None:
        """The guess was wrong: nothing held or still to come reaches the caller."""
        self.state = "discarded"
        self._held.clear()
        self._decided.set()

    async def _out(self, entry: Held) -> None:
        if self.state == "discarded":
            return
        self._held.append(entry)
        if self.state == "held":
            if len(self._held) >= HELD_MAX:
                await self._decided.wait()
            return
        await self._flush()

    async def _flush(self) -> None:
        assert self._emit is not None and self._emit_audio is not None
        async with self._flushing:
            while self._held:
                kind, value = self._held.pop(0)
                if kind == "event":
                    await self._emit(value)
                else:
                    await self._emit_audio(value)
