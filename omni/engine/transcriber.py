"""Transcriber: the asyncio face of the transcriber worker process (transcriber_worker.py).

`transcribe(pcm, language, prompt)` queues one user audio item and yields its text as the
worker makes it: TranscriptionDelta..., then exactly one TranscriptionDone. Items of every
session go to the worker one at a time, oldest first.

Bounded: at most `queue_max` items wait or run. One more ends at once, failed, with an error
naming the limit: a transcript is a side product (the reply never waits for it), so when the
transcriber falls behind, dropping an item and saying so beats a queue that grows without end.
An item's events are bounded by what Whisper can say (448 tokens per 30 s window).

Supervised like the model workers: the process sentinel wakes the supervisor when the worker
exits, and a worker that stops beating is taken as hung. Then every pending item ends failed
and the worker is restarted. The worker dies with the front end (worker.py's parent watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from omni.engine import protocol as p
from omni.engine import transcriber_worker
from omni.engine.api import EngineError
from omni.engine.transcriber_worker import NAME, TranscriberConfig

log = logging.getLogger(__name__)

QUEUE_LIMIT_SETTING = "transcription_queue_max"
QUEUE_FULL = "transcription_queue_full"
WORKER_LOST = "transcriber_restarting"
TRANSCRIPTION_FAILED = "transcription_failed"


@dataclass
class TranscriptionDelta:
    text: str


@dataclass
class TranscriptionDone:
    status: Literal["completed", "failed"]
    transcript: str  # every delta's text, joined
    error: str | None = None
    code: str | None = None  # why it failed: QUEUE_FULL, WORKER_LOST or TRANSCRIPTION_FAILED


TranscriptionEvent = TranscriptionDelta | TranscriptionDone


@dataclass
class TranscriberOptions:
    model_path: str
    device: str = "cpu"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    queue_max: int = 32  # items waiting or running, all sessions together
    start_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 30.0
    allow_faults: bool = False  # tests: accept InjectFault


@dataclass
class _Item:
    message: bytes  # the encoded Transcribe
    # no maxsize: bounded by the model's output length (see the module docstring)
    events: asyncio.Queue[TranscriptionEvent] = field(default_factory=asyncio.Queue)
    sent: bool = False


class Transcriber:
    def __init__(self, options: TranscriberOptions) -> None:
        self.options = options
        self._dir = tempfile.mkdtemp(prefix="omni-transcriber-")
        self._inbox_address = f"ipc://{self._dir}/frontend"
        self._worker_address = f"ipc://{self._dir}/{NAME}"
        self._ctx: zmq.asyncio.Context | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ready = asyncio.Event()
        self._exited = asyncio.Event()
        self._last_beat = 0.0
        self._items: OrderedDict[str, _Item] = OrderedDict()  # oldest first
        self._current: str | None = None  # the request the worker has
        self._tasks: list[asyncio.Task[None]] = []
        self._held = False
        self.restarts = 0

    # -- lifecycle

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(self._inbox_address)
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(self._worker_address)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._supervise())]
        await self._start_worker()

    async def __aenter__(self) -> Transcriber:
        """`async with Transcriber(options)`: the worker started (Whisper loaded), then
        stopped on exit."""
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._fail_all("the transcriber stopped")
        await self._kill_worker()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def _start_worker(self) -> None:
        self._ready.clear()
        device = self.options.device
        dtype = self.options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        cfg = TranscriberConfig(
            self.options.model_path,
            device,
            dtype,
            self._worker_address,
            self._inbox_address,
            self.options.allow_faults,
        )
        spawn = multiprocessing.get_context("spawn")
        proc = spawn.Process(
            target=transcriber_worker.main, args=(cfg,), name=f"omni-{NAME}", daemon=True
        )
        proc.start()
        asyncio.get_running_loop().add_reader(proc.sentinel, self._on_exit, proc.sentinel)
        self._proc = proc
        deadline = time.monotonic() + self.options.start_timeout_s
        while not self._ready.is_set():
            if not proc.is_alive():
                raise EngineError(
                    f"the {NAME} worker exited while loading Whisper (exit code "
                    f"{proc.exitcode}); see its log above"
                )
            if time.monotonic() > deadline:
                raise EngineError(f"the {NAME} worker did not load Whisper in time")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 0.2)
        self._last_beat = time.monotonic()
        self._dispatch()

    def _on_exit(self, sentinel: int) -> None:
        asyncio.get_running_loop().remove_reader(sentinel)
        self._exited.set()

    async def _kill_worker(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        if proc.is_alive():
            proc.kill()
        await asyncio.to_thread(proc.join, 10)  # never on the loop

    async def _supervise(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), 0.25)
            self._exited.clear()
            reason = self._failure()
            while reason is not None:
                log.error("%s; restarting it", reason)
                self.restarts += 1
                self._fail_all(f"{reason}; the item was not transcribed")
                await self._kill_worker()
                try:
                    await self._start_worker()
                    reason = None
                except EngineError as exc:
                    reason = str(exc)
                    await asyncio.sleep(5)

    def _failure(self) -> str | None:
        if self._proc is None or not self._ready.is_set():
            return None
        if not self._proc.is_alive():
            return f"the {NAME} worker died (exit code {self._proc.exitcode})"
        if time.monotonic() - self._last_beat > self.options.heartbeat_timeout_s:
            return f"the {NAME} worker stopped responding"
        return None

    def _fail_all(self, error: str) -> None:
        self._current = None
        for item in self._items.values():
            item.events.put_nowait(TranscriptionDone("failed", "", error, WORKER_LOST))
        self._items.clear()

    # -- items

    async def transcribe(
        self, pcm: np.ndarray, language: str | None = None, prompt: str | None = None
    ) -> AsyncIterator[TranscriptionEvent]:
        """One item's text as it comes (float32 16 kHz audio); ends with a TranscriptionDone."""
        if self.pending >= self.options.queue_max:
            yield TranscriptionDone(
                "failed",
                "",
                f"the transcriber is behind: {self.pending} items are queued, its limit "
                f"({QUEUE_LIMIT_SETTING}); this item is not transcribed",
                QUEUE_FULL,
            )
            return
        request = uuid.uuid4().hex
        message = p.Transcribe(request, p.Array.of(np.asarray(pcm, np.float32)), language, prompt)
        item = self._items[request] = _Item(p.encode(message))
        self._dispatch()
        try:
            while True:
                event = await item.events.get()
                if isinstance(event, TranscriptionDone):
                    self._items.pop(request, None)  # done now, however long the reader waits
                yield event
                if isinstance(event, TranscriptionDone):
                    return
        finally:
            self._items.pop(request, None)  # left early: a queued item is never sent

    @property
    def pending(self) -> int:
        """Items waiting for the worker or in it."""
        return len(self._items)

    def hold(self) -> None:
        """Tests: send the worker nothing more until `release` (items stay queued)."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._dispatch()

    def _dispatch(self) -> None:
        """Send the oldest queued item when the worker is free."""
        if self._current is not None or self._held or not self._ready.is_set():
            return
        for request, item in self._items.items():
            if not item.sent:
                item.sent = True
                self._current = request
                self._out.send(item.message)
                return

    async def _messages(self) -> AsyncIterator[p.Msg]:
        """The worker's messages as they come (an undecodable one is logged and skipped)."""
        while True:
            data = await self._inbox.recv()
            try:
                yield p.decode(data)
            except msgspec.DecodeError:
                log.exception("undecodable message from the %s worker", NAME)

    async def _read(self) -> None:
        async for msg in self._messages():
            match msg:
                case p.Ready():
                    self._ready.set()
                case p.Heartbeat():
                    self._last_beat = time.monotonic()
                case p.TranscriptDelta():
                    item = self._items.get(msg.request)
                    if item is not None:
                        item.events.put_nowait(TranscriptionDelta(msg.text))
                case p.TranscriptDone():
                    item = self._items.get(msg.request)
                    if item is not None:
                        completed = msg.status == "completed"
                        item.events.put_nowait(
                            TranscriptionDone(
                                "completed" if completed else "failed",
                                msg.text,
                                msg.error,
                                None if completed else TRANSCRIPTION_FAILED,
                            )
                        )
                    if self._current == msg.request:
                        self._current = None
                        self._dispatch()
                case p.WorkerError():
                    log.error("%s worker: %s", NAME, msg.message)

    def inject_fault(self, kind: str, after_steps: int = 0) -> None:
        """Tests only (allow_faults): make the worker crash or hang mid-item."""
        if not self.options.allow_faults:
            raise EngineError("fault injection is disabled")
        self._out.send(p.encode(p.InjectFault(kind, after_steps)))

