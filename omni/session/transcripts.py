"""The caller's words as text: each committed user audio item transcribed beside its reply.

While a session's `transcription` is set, every user audio item it commits gets a task of its
own that runs the item's audio through the transcriber (omni/engine/transcriber.py) and sends
`conversation.item.input_audio_transcription.delta` events as the text comes, then `.completed`
(the transcript, also written into the item's content, so `conversation.item.retrieve` returns
it) or `.failed` (why, naming the limit or the fault). Nothing in the turn waits for it: the
reply starts at once, and transcript events come before, between or after the reply's, as
OpenAI's do. The tasks are bounded by the transcriber's queue, which refuses an item at once
when full; closing the session cancels them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from omni.engine.api import INPUT_SAMPLE_RATE
from omni.engine.transcriber import Transcriber, TranscriptionDelta
from omni.metrics import Metrics
from omni.session.conversation import Item
from omni.session.input_transcription import InputTranscription

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
EVENT = "conversation.item.input_audio_transcription"
CONTENT_INDEX = 0  # a committed item has one content part: its audio
TRANSCRIPTION_OFF = "transcription_off"


class ItemTranscripts:
    def __init__(self, transcriber: Transcriber | None, emit: Emit, metrics: Metrics) -> None:
        self.transcriber = transcriber
        self.emit = emit
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, item: Item, pcm: np.ndarray, settings: InputTranscription) -> None:
        """Transcribe `item` (its float32 16 kHz audio) in the background."""
        task = asyncio.create_task(self._run(item, pcm, settings))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, item: Item, pcm: np.ndarray, settings: InputTranscription) -> None:
        committed = time.monotonic()
        if self.transcriber is None:
            await self._failed(
                item,
                TRANSCRIPTION_OFF,
                "input transcription is off on this server (its transcriber_model is none)",
            )
            return
        try:
            async for event in self.transcriber.transcribe(pcm, settings.language, settings.prompt):
                if isinstance(event, TranscriptionDelta):
                    await self._event(item, "delta", delta=event.text)
                elif event.status == "completed":
                    item.content[CONTENT_INDEX]["transcript"] = event.transcript
                    seconds = round(len(pcm) / INPUT_SAMPLE_RATE, 3)
                    await self._event(
                        item,
                        "completed",
                        transcript=event.transcript,
                        usage={"type": "duration", "seconds": seconds},
                    )
                    self.metrics.transcriptions.labels("completed").inc()
                    self.metrics.transcription_seconds.observe(time.monotonic() - committed)
                else:
                    await self._failed(item, event.code or "transcription_failed", event.error)
        except Exception:  # a bug here must not end the call; the client hears why
            log.exception("transcribing item %s failed", item.id)
            await self._failed(item, "server_error", "internal error")

    async def _failed(self, item: Item, code: str, message: str | None) -> None:
        self.metrics.transcriptions.labels("failed").inc()
        error = {"type": "server_error", "code": code, "message": message, "param": None}
        await self._event(item, "failed", error=error)

    async def _event(self, item: Item, kind: str, **fields: Any) -> None:
        where = {"item_id": item.id, "content_index": CONTENT_INDEX}
        await self.emit({"type": f"{EVENT}.{kind}", **where, **fields})
