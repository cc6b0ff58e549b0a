"""The engine side of a session: calls made one at a time, in order, and the pending turn.

The engine takes one call at a time per session, and the order of calls is the order of the
prompt, so every engine call a session makes goes through this FIFO and one worker task;
only `cancel` goes around it (the session calls the engine directly) so a barge-in lands
within one model step even while `respond` is streaming. Speech that arrives during a reply
queues behind it and reaches the engine once the reply has ended.

It also mirrors the engine's pending user turn, so uncommitted input can be taken back
(`rebuild`: clear the engine's turn and send the rest again), since the engine can only
forget a whole turn.

Both are bounded. The mirror keeps raw media (audio, camera frames, images), so a turn may
hold at most `max_turn_bytes`: `add` past it raises `turn_input_full` and the piece is not
taken (the session drops it and says so once). The calls waiting for the engine (a stalled
or slow model) are capped at `max_calls`: while `full`, the session refuses new client
events and media with `engine_busy`; what one event adds past the cap is small and bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from omni.engine.api import Engine, EngineError
from omni.session.errors import RealtimeError

log = logging.getLogger(__name__)

Call = Callable[[], Awaitable[None]]
OnError = Callable[[RealtimeError], Awaitable[None]]


@dataclass
class TurnInput:
    """One piece of the user's pending turn."""

    kind: Literal["audio", "frame", "image", "text"]
    data: Any  # float32 16 kHz audio, uint8 HxWx3 image, or text
    item_id: str | None = None  # None: still in the input buffer (uncommitted)
    # audio and camera frames: seconds on the caller's audio clock (Engine.append_audio)
    timestamp: float | None = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes if hasattr(self.data, "nbytes") else len(self.data)


class EngineQueue:
    def __init__(
        self,
        engine: Engine,
        session_id: str,
        on_error: OnError,
        *,
        max_calls: int,
        max_turn_bytes: int,
    ) -> None:
        self.engine = engine
        self.session_id = session_id
        self.max_calls = max_calls
        self.max_turn_bytes = max_turn_bytes
        self._turn: list[TurnInput] = []  # what the engine has (or will have) for this turn
        self.turn_bytes = 0
        # the client event being handled; errors from the calls it causes name it
        self.event_id: str | None = None
        self._on_error = on_error
        # unbounded as a queue, bounded by `full` (see the module docstring)
        self._calls: asyncio.Queue[tuple[Call, str | None]] = asyncio.Queue()

    @property
    def turn(self) -> list[TurnInput]:
        return self._turn

    @turn.setter
    def turn(self, pieces: list[TurnInput]) -> None:
        self._turn = pieces
        self.turn_bytes = sum(piece.nbytes for piece in pieces)

    @property
    def full(self) -> bool:
        """Too many calls wait for the engine: refuse new input until it catches up."""
        return self._calls.qsize() >= self.max_calls

    def call(self, call: Call) -> None:
        """Run `call` after everything queued before it; errors go to the client as events."""
        self._calls.put_nowait((call, self.event_id))

    def check_room(self, nbytes: int) -> None:
        """Raise `turn_input_full` unless the pending turn can take `nbytes` more."""
        if self.turn_bytes + nbytes > self.max_turn_bytes:
            raise RealtimeError(
                "turn_input_full",
                f"the pending turn holds {self.turn_bytes} bytes of media, near its "
                f"{self.max_turn_bytes}-byte limit; commit and answer it, or clear it",
            )

    def add(self, piece: TurnInput) -> None:
        self.check_room(piece.nbytes)
        self._turn.append(piece)
        self.turn_bytes += piece.nbytes
        self.call(partial(self._send, piece))

    def uncommitted(self) -> list[TurnInput]:
        return [piece for piece in self.turn if piece.item_id is None]

    def rebuild(self, keep: list[TurnInput]) -> None:
        """Make the pending turn exactly `keep`, in order."""
        self.turn = list(keep)

        async def rebuild() -> None:
            await self.engine.clear_user_turn(self.session_id)
            for piece in keep:
                await self._send(piece)

        self.call(rebuild)

    def end_turn(self, respond: Call) -> None:
        """Reply to the committed turn; uncommitted input moves to the next turn."""
        pending = self.uncommitted()
        if pending:
            self.rebuild([piece for piece in self.turn if piece.item_id is not None])
        self.call(respond)
        self.turn = []
        for piece in pending:
            self.add(piece)

    async def _send(self, piece: TurnInput) -> None:
        match piece.kind:
            case "audio":
                await self.engine.append_audio(self.session_id, piece.data, piece.timestamp)
            case "frame":
                await self.engine.append_video_frame(self.session_id, piece.data, piece.timestamp)
            case "image":
                await self.engine.add_image(self.session_id, piece.data)
            case "text":
                await self.engine.add_text(self.session_id, piece.data)
        if piece.item_id is not None:  # the engine's log knows which item the input is
            await self.engine.label_input(self.session_id, piece.item_id, last_only=True)

    async def run(self) -> None:
        """The worker: runs until cancelled."""
        while True:
            call, event_id = await self._calls.get()
            try:
                await call()
            except RealtimeError as error:
                error.event_id = error.event_id or event_id
                await self._on_error(error)
            except EngineError as exc:
                await self._on_error(
                    RealtimeError("engine_error", str(exc), type="server_error", event_id=event_id)
                )
            except Exception:  # a broken call must not stop the queue
                log.exception("session %s: engine call failed", self.session_id)
                await self._on_error(
                    RealtimeError(
                        "server_error", "internal error", type="server_error", event_id=event_id
                    )
                )
