"""OmniEngine: the asyncio face of the thinker and talker worker processes.

It starts and supervises both workers, forwards session input to the thinker, and turns the
workers' messages back into `TextDelta` / `AudioChunk` / `ReplyDone` events for the session
layer. One reader task routes every incoming message to the reply it belongs to.

A worker that dies (its process sentinel) or stops beating (a hung model step) is noticed by
the supervisor task: every reply in flight ends with a `failed` ReplyDone naming the worker,
both workers are restarted (the talker's context rows mirror the thinker's cache, so they
restart together) and the sessions are reopened with an empty conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.asyncio

from omni.engine import protocol as p
from omni.engine import talker_worker, thinker_worker
from omni.engine.api import (
    SAMPLES_PER_CODE,
    AudioChunk,
    EngineError,
    EngineEvent,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
    StageTimings,
    TextDelta,
)
from omni.engine.worker import Addresses, WorkerConfig

log = logging.getLogger(__name__)

WORKERS = {"thinker": thinker_worker.main, "talker": talker_worker.main}


@dataclass
class EngineConfig:
    model_path: str
    thinker_device: str = "cpu"
    talker_device: str = "cpu"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    max_codec_tokens: int = 4096  # per reply, unless ReplyOptions says otherwise
    max_frame_side: int = 448
    # Token2Wav's ODE solver: rk4 (transformers) or euler (4x fewer DiT passes, Qwen's own
    # streaming choice); auto: rk4 on GPU, euler on CPU, where rk4 can't keep up in real time
    vocoder_solver: str = "auto"
    # ODE time points per chunk (transformers' num_steps), and for a reply's first chunk
    # (None: the same); fewer first-chunk steps give sooner first audio
    vocoder_steps: int = 10
    vocoder_first_chunk_steps: int | None = None
    start_timeout_s: float = 900.0  # loading a 7B checkpoint can take minutes
    heartbeat_timeout_s: float = 30.0  # no beat for this long while alive: the worker hangs
    allow_faults: bool = False  # tests: accept InjectFault messages
    # ZeroMQ endpoints; None: ipc:// sockets in a private temp dir
    addresses: Addresses | None = None


class _WorkerLost(Exception):
    pass


@dataclass
class _Reply:
    session: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class _Session:
    options: SessionOptions
    reply: str | None = None
    errors: list[str] = field(default_factory=list)


class OmniEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._dir = tempfile.mkdtemp(prefix="omni-")
        self.addresses = config.addresses or Addresses(
            thinker=f"ipc://{self._dir}/thinker",
            talker=f"ipc://{self._dir}/talker",
            frontend=f"ipc://{self._dir}/frontend",
        )
        self._ctx: zmq.asyncio.Context | None = None
        self._procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._last_beat: dict[str, float] = {}
        self._sessions: dict[str, _Session] = {}
        self._replies: dict[str, _Reply] = {}
        self._results: dict[str, asyncio.Future[int]] = {}
        self._tasks: list[asyncio.Task] = []
        self._restart_lock = asyncio.Lock()
        self.restarts = 0
        self.ready = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(self.addresses.frontend)
        self._out = {}
        for name in WORKERS:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(getattr(self.addresses, name))
            self._out[name] = sock
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._supervise())]
        await self._start_workers()

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._kill_workers()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # never wait on messages for workers that are gone
            self._ctx = None

    async def _start_workers(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        for name, target in WORKERS.items():
            self._ready[name] = asyncio.Event()
            device = getattr(self.config, f"{name}_device")
            cfg = WorkerConfig(
                model_path=self.config.model_path,
                device=device,
                dtype=_dtype_for(self.config.dtype, device),
                addresses=self.addresses,
                allow_faults=self.config.allow_faults,
                max_frame_side=self.config.max_frame_side,
                vocoder_steps=self.config.vocoder_steps,
                vocoder_first_chunk_steps=self.config.vocoder_first_chunk_steps,
                vocoder_solver=_solver_for(self.config.vocoder_solver, self.config.talker_device),
            )
            proc = spawn.Process(target=target, args=(cfg,), name=f"omni-{name}", daemon=True)
            proc.start()
            self._procs[name] = proc
        deadline = time.monotonic() + self.config.start_timeout_s
        for name in WORKERS:
            while not self._ready[name].is_set():
                if not self._procs[name].is_alive():
                    code = self._procs[name].exitcode
                    raise EngineError(f"the {name} worker exited while loading the model (exit code {code}); see its log above")
                if time.monotonic() > deadline:
                    raise EngineError(f"the {name} worker did not load the model within {self.config.start_timeout_s:.0f} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._ready[name].wait(), 0.2)
            self._last_beat[name] = time.monotonic()
        self.ready = True
        for session_id, session in self._sessions.items():
            self._send("thinker", p.OpenSession(session_id, session.options.instructions))

    def _kill_workers(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
        self._procs.clear()

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if not self.ready:
                continue
            reason = self._failure()
            while reason is not None:
                try:
                    await self._restart(reason)
                    reason = None
                except Exception as exc:  # keep trying: a restart can fail (e.g. GPU busy)
                    log.exception("restarting the workers failed")
                    reason = f"restarting the workers failed: {exc}"
                    await asyncio.sleep(5)

    def _failure(self) -> str | None:
        now = time.monotonic()
        for name, proc in self._procs.items():
            if not proc.is_alive():
                return f"the {name} worker died (exit code {proc.exitcode})"
            if now - self._last_beat.get(name, now) > self.config.heartbeat_timeout_s:
                return f"the {name} worker stopped responding for {self.config.heartbeat_timeout_s:.0f} s"
        return None

    async def _restart(self, reason: str) -> None:
        async with self._restart_lock:
            log.error("%s; restarting the workers", reason)
            self.ready = False
            self.restarts += 1
            lost = f"{reason}; the workers were restarted and this conversation's context was lost"
            for reply in self._replies.values():
                reply.queue.put_nowait(_WorkerLost(lost))
            for future in self._results.values():
                if not future.done():
                    future.set_exception(EngineError(lost))
            for session in self._sessions.values():
                if session.reply is None:  # a reply in flight reports it itself
                    session.errors.append(lost)
            self._kill_workers()
            await self._start_workers()

    # -- sessions -------------------------------------------------------------------------

    async def open_session(self, session_id: str, options: SessionOptions) -> None:
        self._check_ready()
        if session_id in self._sessions:
            raise EngineError(f"session {session_id} is already open")
        self._sessions[session_id] = _Session(options)
        self._send("thinker", p.OpenSession(session_id, options.instructions))

    async def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        if session.reply is not None:
            await self.cancel(session_id)
        self._send("thinker", p.CloseSession(session_id))  # the thinker relays it to the talker

    async def append_audio(self, session_id: str, pcm: np.ndarray) -> None:
        self._session(session_id)
        self._send("thinker", p.AppendAudio(session_id, p.Array.of(np.asarray(pcm, np.float32))))

    async def append_video_frame(self, session_id: str, rgb: np.ndarray) -> None:
        self._session(session_id)
        self._send("thinker", p.AppendFrame(session_id, p.Array.of(_rgb(rgb))))

    async def add_image(self, session_id: str, rgb: np.ndarray) -> None:
        self._session(session_id)
        self._send("thinker", p.AddImage(session_id, p.Array.of(_rgb(rgb))))

    async def add_text(self, session_id: str, text: str) -> None:
        self._session(session_id)
        self._send("thinker", p.AddText(session_id, text))

    async def clear_user_turn(self, session_id: str) -> None:
        self._session(session_id)
        self._send("thinker", p.ClearTurn(session_id))

    async def cancel(self, session_id: str) -> None:
        session = self._session(session_id)
        if session.reply is not None:
            for name in WORKERS:
                self._send(name, p.Cancel(session_id, session.reply))

    async def truncate_reply(self, session_id: str, audio_ms: int) -> int:
        """One codec token is 20 ms and the talker consumes one text token per codec token,
        so the caller heard (about) the first audio_ms / 20 text tokens."""
        self._session(session_id)
        request = uuid.uuid4().hex
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._results[request] = future
        try:
            self._send("thinker", p.Truncate(session_id, request, max(0, audio_ms) // 20))
            return await asyncio.wait_for(future, timeout=30)
        finally:
            self._results.pop(request, None)

    async def respond(self, session_id: str, options: ReplyOptions) -> AsyncIterator[EngineEvent]:
        session = self._session(session_id)
        if session.reply is not None:
            raise EngineError("a reply is already in progress in this session")
        reply_id = uuid.uuid4().hex
        state = self._replies[reply_id] = _Reply(session_id)
        session.reply = reply_id
        voice = options.voice or session.options.voice
        max_codes = options.max_codec_tokens or self.config.max_codec_tokens
        started = time.perf_counter()
        timings = StageTimings()
        text, text_tokens, input_tokens, audio_samples = "", 0, 0, 0
        token_ids: list[int] = []
        codes: list[int] = []
        statuses: dict[str, str] = {}
        error: str | None = None
        waiting = {"thinker", "talker"} if options.output_audio else {"thinker"}
        self._send(
            "thinker",
            p.Respond(
                session_id,
                reply_id,
                options.output_audio,
                voice,
                options.greedy,
                options.max_text_tokens,
                options.min_text_tokens,
                max_codes,
                options.min_codec_tokens,
                options.talker_top_k,
                options.talker_top_p,
                options.talker_temperature,
                options.talker_repetition_penalty,
                options.instructions,
                options.seed,
            ),
        )

        def ms() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            while waiting:
                msg = await state.queue.get()
                match msg:
                    case p.TextOut():
                        if timings.first_text_ms is None:
                            timings.first_text_ms = ms()
                        yield TextDelta(msg.text, msg.token_ids)
                    case p.ThinkerDone():
                        waiting.discard("thinker")
                        statuses["thinker"] = msg.status
                        text, text_tokens = msg.text, msg.text_tokens
                        input_tokens, timings.prefill_ms = msg.input_tokens, msg.prefill_ms
                        token_ids = msg.token_ids
                        if not msg.talker_started:
                            waiting.discard("talker")
                    case p.CodeOut():
                        timings.first_codec_ms = ms()
                    case p.AudioOut():
                        if timings.first_audio_ms is None:
                            timings.first_audio_ms = ms()
                        pcm = msg.pcm.numpy()
                        audio_samples = msg.first_sample + pcm.size
                        yield AudioChunk(pcm, msg.first_sample)
                    case p.TalkerDone():
                        waiting.discard("talker")
                        statuses["talker"] = msg.status
                        audio_samples, codes = msg.audio_samples, msg.codes
                    case p.WorkerError():
                        error = msg.message  # the worker also ends the reply with a Done
                    case _WorkerLost():
                        error, waiting = str(msg), set()
                        statuses["thinker"] = "failed"
        finally:
            if waiting:  # the consumer stopped early: stop the workers too
                for name in WORKERS:
                    self._send(name, p.Cancel(session_id, reply_id))
            self._replies.pop(reply_id, None)
            session.reply = None
        timings.total_ms = ms()
        if "failed" in statuses.values() or (error and not statuses):
            status = "failed"
        elif "cancelled" in statuses.values():
            status = "cancelled"
        else:
            status = "completed"
        assert audio_samples % SAMPLES_PER_CODE == 0 or status != "completed"
        yield ReplyDone(
            status, text, text_tokens, audio_samples, timings, input_tokens, error, token_ids, codes
        )

    def pop_errors(self, session_id: str) -> list[str]:
        """Problems found after a call returned (input the thinker could not use, a worker
        restart that lost the conversation), oldest first."""
        session = self._sessions.get(session_id)
        if session is None:
            return []
        errors, session.errors = session.errors, []
        return errors

    def inject_fault(self, worker: str, kind: str, after_steps: int = 0) -> None:
        """Tests only (EngineConfig.allow_faults): make a worker crash or hang mid-work."""
        if not self.config.allow_faults:
            raise EngineError("fault injection is disabled")
        self._send(worker, p.InjectFault(kind, after_steps))

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, worker: str, msg: p.Msg) -> None:
        if not self.ready:
            raise EngineError("the model workers are not running (starting or restarting)")
        self._out[worker].send(p.encode(msg))

    def _session(self, session_id: str) -> _Session:
        self._check_ready()
        session = self._sessions.get(session_id)
        if session is None:
            raise EngineError(f"no open session {session_id}")
        return session

    def _check_ready(self) -> None:
        if not self.ready:
            raise EngineError("the model workers are not running (starting or restarting)")

    async def _read(self) -> None:
        while True:
            data = await self._inbox.recv()
            try:
                msg = p.decode(data)
            except Exception:
                log.exception("undecodable message from a worker")
                continue
            match msg:
                case p.Ready():
                    self._ready[msg.worker].set()
                case p.Heartbeat():
                    self._last_beat[msg.worker] = time.monotonic()
                case p.Result():
                    future = self._results.get(msg.request)
                    if future is not None and not future.done():
                        future.set_result(msg.value)
                case _:
                    reply = self._replies.get(getattr(msg, "reply", None) or "")
                    if reply is not None:
                        reply.queue.put_nowait(msg)
                    elif isinstance(msg, p.WorkerError):
                        log.error("%s worker: %s (session %s)", msg.worker, msg.message, msg.session)
                        session = self._sessions.get(msg.session or "")
                        if session is not None:
                            session.errors.append(msg.message)


@contextlib.asynccontextmanager
async def running_engine(config: EngineConfig) -> AsyncIterator[OmniEngine]:
    """Start the workers (loading the model), yield the engine, stop them on exit."""
    engine = OmniEngine(config)
    try:
        await engine.start()
        yield engine
    finally:
        await engine.stop()


def resolve_devices(device: str = "auto", talker_device: str | None = None) -> tuple[str, str]:
    """(thinker, talker) devices. auto: the first two GPUs when there are two, else one, else
    CPU; another device: both workers on it; `talker_device` puts the talker elsewhere."""
    import torch

    if device != "auto":
        thinker = talker = device
    elif not torch.cuda.is_available():
        thinker = talker = "cpu"
    else:
        thinker, talker = "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    return thinker, talker_device or talker


def _rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise EngineError(f"expected a uint8 HxWx3 RGB image, got {rgb.dtype} {rgb.shape}")
    return rgb


def _solver_for(solver: str, device: str) -> str:
    if solver != "auto":
        return solver
    return "rk4" if device.startswith("cuda") else "euler"


def _dtype_for(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"
