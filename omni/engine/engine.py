"""OmniEngine: the asyncio face of the thinker, talker and vocoder worker processes.

It starts and supervises the workers, forwards session input to the thinker, and turns the
workers' messages back into `TextDelta` / `AudioChunk` / `ReplyDone` events for the session
layer. One reader task routes every incoming message to the reply it belongs to.

A worker that dies (its process sentinel wakes the supervisor) or stops beating (a hung
model step) is noticed by the supervisor task: every reply in flight ends with a `failed`
ReplyDone naming the worker, every session hears of it through its `on_error`, and all
workers are restarted (the talker's context rows mirror the thinker's cache, so they restart
together). Each session's conversation is then rebuilt from its replay log (replay.py).
Input that arrives while the workers restart goes into the log and reaches the new workers
with the rest; a reply asked for meanwhile is refused.

Each reply's queue is bounded (REPLY_QUEUE_MAX): the reader task must never wait, so a
reply whose consumer stopped reading is cancelled in the workers and ends failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

from omni.checkpoints.family import QWEN2_5_OMNI, family_of
from omni.engine import protocol as p
from omni.engine import talker_worker, thinker_worker, vocoder_worker
from omni.engine.heard import SpeakingRate, SpokenReply, heard_tokens
from omni.engine.replay import ReplayLog
from omni.engine.api import (
    SAMPLES_PER_CODE,
    AudioChunk,
    EngineCapacityError,
    EngineError,
    EngineEvent,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
    StageTimings,
    TextDelta,
    Truncation,
)
from omni.engine.varlen_attention import check_attn_implementation
from omni.engine.worker import Addresses, WorkerConfig

log = logging.getLogger(__name__)

WORKERS = {
    "thinker": thinker_worker.main,
    "talker": talker_worker.main,
    "vocoder": vocoder_worker.main,
}
# Messages a reply may have waiting for its consumer. A consumer that reads keeps a few here
# (each takes microseconds to handle; a GPU makes ~100 tokens/s); a whole default reply,
# 1024 text deltas and its audio in 0.5-1 s chunks, would nearly fill it even if nobody read.
REPLY_QUEUE_MAX = 1024


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
    replay_max_bytes: int = 32_000_000  # per session: what a restart can rebuild (replay.py)
    allow_faults: bool = False  # tests: accept InjectFault messages
    # batching: every model step runs all sessions with work in one forward
    kv_slots: int = 16  # sessions admitted (each worker reserves KV memory for this many)
    max_context_tokens: int = 32768  # KV memory per session and stage
    # the thinker's context per session is kept within this (None: max_context_tokens minus
    # reply_reserve_tokens), by session.truncation (context_budget.py)
    context_budget_tokens: int | None = None
    reply_reserve_tokens: int = 1024
    step_token_budget: int = 512  # rows per batched forward: decode rows first, then prefill
    max_batch: int = 16  # sessions per forward; 1 turns batching off (one session per forward)
    # sdpa or eager take the batched forward's masks; flash_attention_2 runs rows packed
    attn_implementation: str = "sdpa"
    cuda_graphs: bool = True  # decode-only steps as CUDA graphs, on CUDA devices only

    def __post_init__(self) -> None:
        room = self.max_context_tokens - self.reply_reserve_tokens
        if room < 1 or (self.context_budget_tokens or room) > room:
            raise ValueError(
                f"the context budget ({self.context_budget_tokens or room} tokens) must be "
                f"positive and leave a reply its reserve ({self.reply_reserve_tokens} of "
                f"{self.max_context_tokens} tokens)"
            )


class _ReplyEnded(Exception):
    """The reply ends failed without its workers' Done messages (a worker lost, an overflow)."""


@dataclass
class _Reply:
    session: str
    # no maxsize: `deliver` bounds it, and the one `end` always fits behind it
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: bool = False

    def deliver(self, msg: p.Msg) -> bool:
        """Queue a worker message; False when the queue is full (nothing was queued)."""
        if self.ended:
            return True  # the consumer will stop at the end already queued
        if self.queue.qsize() >= REPLY_QUEUE_MAX:
            return False
        self.queue.put_nowait(msg)
        return True

    def end(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(_ReplyEnded(reason))


@dataclass
class _Session:
    options: SessionOptions
    replay: ReplayLog
    reply: str | None = None
    last_spoken: SpokenReply | None = None  # the latest reply, for truncate_reply
    spoken_before: SpokenReply | None = None  # the one before it (a discarded reply's)
    rate: SpeakingRate = field(default_factory=SpeakingRate)


class OmniEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.family = family_of(Path(config.model_path))
        self._dir = tempfile.mkdtemp(prefix="omni-")
        # ipc:// sockets in a private temp dir (tcp:// works the same across hosts)
        self.addresses = Addresses(
            thinker=f"ipc://{self._dir}/thinker",
            talker=f"ipc://{self._dir}/talker",
            vocoder=f"ipc://{self._dir}/vocoder",
            frontend=f"ipc://{self._dir}/frontend",
        )
        self._ctx: zmq.asyncio.Context | None = None
        self._procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._last_beat: dict[str, float] = {}
        self.kv_stats: dict[str, dict[str, int]] = {}  # per worker, from its heartbeats
        self.context_tokens: dict[str, int] = {}  # per session, from the thinker's heartbeats
        self._sessions: dict[str, _Session] = {}
        self._replies: dict[str, _Reply] = {}
        self._results: dict[str, asyncio.Future[int]] = {}
        self._tasks: list[asyncio.Task] = []
        self._notices: set[asyncio.Task] = set()  # on_error calls still running
        self._worker_exited = asyncio.Event()  # set from a dead worker's sentinel
        self._restart_lock = asyncio.Lock()
        self._restarting = False
        self.restarts = 0
        self.ready = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for device in {self.config.thinker_device, self.config.talker_device}:
            check_attn_implementation(self.config.attn_implementation, device)
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
        for notice in list(self._notices):
            notice.cancel()
        await self._kill_workers()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # never wait on messages for workers that are gone
            self._ctx = None

    async def _start_workers(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        for name, target in WORKERS.items():
            self._ready[name] = asyncio.Event()
            # Token2Wav runs beside the talker LM, on its device
            device = self.config.thinker_device if name == "thinker" else self.config.talker_device
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
                kv_slots=self.config.kv_slots,
                max_context_tokens=self.config.max_context_tokens,
                context_budget_tokens=self.config.context_budget_tokens,
                reply_reserve_tokens=self.config.reply_reserve_tokens,
                step_token_budget=self.config.step_token_budget,
                max_batch=self.config.max_batch,
                attn_implementation=self.config.attn_implementation,
                cuda_graphs=self.config.cuda_graphs and device.startswith("cuda"),
            )
            proc = spawn.Process(target=target, args=(cfg,), name=f"omni-{name}", daemon=True)
            proc.start()
            # the sentinel turns readable when the process ends: wake the supervisor now
            asyncio.get_running_loop().add_reader(proc.sentinel, self._on_exit, proc.sentinel)
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
        self.ready, self._restarting = True, False
        for session_id, session in self._sessions.items():
            self._rebuild(session_id, session)

    def _rebuild(self, session_id: str, session: _Session) -> None:
        """Send the new thinker a session's conversation again (the talker follows its rows)."""
        self._send("thinker", _open_message(session_id, session.options, session.replay.first_turn))
        for data in session.replay.messages():
            self._out["thinker"].send(data)

    def _on_exit(self, sentinel: int) -> None:
        asyncio.get_running_loop().remove_reader(sentinel)  # readable from now on: once is enough
        self._worker_exited.set()

    async def _kill_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for proc in self._procs.values():
            loop.remove_reader(proc.sentinel)
            if proc.is_alive():
                proc.kill()
            await asyncio.to_thread(proc.join, 10)  # SIGKILLed: quick, but never on the loop
        self._procs.clear()

    async def _supervise(self) -> None:
        while True:
            # beats are checked every 0.25 s; a process that exits wakes this at once
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._worker_exited.wait(), 0.25)
            self._worker_exited.clear()
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
            self._restarting = True
            self.restarts += 1
            # sessions hear it first, so their error comes before the failed reply's end
            for session in self._sessions.values():
                notice = f"{reason}; the workers are restarting and will rebuild this conversation"
                if session.replay.dropped_turns:
                    notice += f" without its {session.replay.dropped_turns} oldest turn(s)"
                if session.reply is not None:
                    notice += "; the reply in progress failed"
                self._notify(session, notice)
            failed = f"{reason}; this reply failed and the workers are restarting"
            for reply in self._replies.values():
                reply.end(failed)
            for future in self._results.values():
                if not future.done():
                    future.set_exception(EngineError(f"{reason}; the workers are restarting"))
            await self._kill_workers()
            await self._start_workers()  # raises: the supervisor tries again

    # -- sessions -------------------------------------------------------------------------

    async def open_session(self, session_id: str, options: SessionOptions) -> None:
        self._check_ready()
        if session_id in self._sessions:
            raise EngineError(f"session {session_id} is already open")
        if len(self._sessions) >= self.config.kv_slots:  # each worker holds one KV slot per session
            raise EngineCapacityError(
                f"the model is at capacity: all {self.config.kv_slots} KV memory slots are in use"
            )
        if options.voice is None:
            options = replace(options, voice=self.family.voices[0])
        replay = ReplayLog(session_id, options.instructions, self.config.replay_max_bytes)
        rate = SpeakingRate(code_ms=self.family.codec_token_ms)
        self._sessions[session_id] = _Session(options, replay, rate=rate)
        self._send("thinker", _open_message(session_id, options, 0))

    async def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None or not self.ready:  # restarting: the new workers never hear of it
            return
        if session.reply is not None:
            for name in WORKERS:
                self._send(name, p.Cancel(session_id, session.reply))
        self._send("thinker", p.CloseSession(session_id))  # the thinker relays it to the talker

    async def append_audio(
        self, session_id: str, pcm: np.ndarray, timestamp: float | None = None
    ) -> None:
        pcm = np.asarray(pcm, np.float32)
        self._add_input(
            session_id, lambda: p.AppendAudio(session_id, p.Array.of(pcm), _seconds(timestamp))
        )

    async def append_video_frame(
        self, session_id: str, rgb: np.ndarray, timestamp: float | None = None
    ) -> None:
        self._add_input(
            session_id,
            lambda: p.AppendFrame(session_id, p.Array.of(_rgb(rgb)), _seconds(timestamp)),
        )

    async def add_image(self, session_id: str, rgb: np.ndarray) -> None:
        self._add_input(session_id, lambda: p.AddImage(session_id, p.Array.of(_rgb(rgb))))

    async def add_text(self, session_id: str, text: str) -> None:
        self._add_input(session_id, lambda: p.AddText(session_id, text))

    async def clear_user_turn(self, session_id: str) -> None:
        self._session(session_id, restarting_ok=True).replay.clear_turn()
        if self.ready:
            self._send("thinker", p.ClearTurn(session_id))

    def _add_input(self, session_id: str, message: Callable[[], p.Msg]) -> None:
        """Log the input for a rebuild, and send it unless the workers are restarting (then
        the rebuild brings it)."""
        session = self._session(session_id, restarting_ok=True)
        data = p.encode(message())
        session.replay.add_input(data)
        if self.ready:
            self._out["thinker"].send(data)

    async def cancel(self, session_id: str) -> None:
        session = self._session(session_id, restarting_ok=True)
        if session.reply is not None and self.ready:  # a restart ends the reply itself
            for name in WORKERS:
                self._send(name, p.Cancel(session_id, session.reply))

    async def truncate_reply(self, session_id: str, audio_ms: int) -> int:
        """Keep the text tokens of the last reply that its first `audio_ms` of audio spoke
        (heard.py says how they are found), in the thinker and in the replay log."""
        session = self._session(session_id)
        spoken = session.last_spoken
        keep = 0 if spoken is None else heard_tokens(spoken, audio_ms, session.rate.codes_per_token)
        return await self.keep_reply_tokens(session_id, keep)

    async def keep_reply_tokens(self, session_id: str, tokens: int) -> int:
        self._session(session_id)
        kept = await self._ask_thinker(lambda request: p.Truncate(session_id, request, max(0, tokens)))
        session = self._sessions.get(session_id)
        if session is not None:
            session.replay.truncated(kept)
        return kept

    async def context_digest(self, session_id: str) -> int:
        """A digest of the session's thinker context, token ids in order (not part of the
        Engine protocol: for checks that two conversations are the same)."""
        self._session(session_id)
        return await self._ask_thinker(lambda request: p.Digest(session_id, request))

    async def _ask_thinker(self, message: Callable[[str], p.Msg]) -> int:
        """Send the thinker a request and wait (30 s at most) for its Result."""
        request = uuid.uuid4().hex
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._results[request] = future
        try:
            self._send("thinker", message(request))
            return await asyncio.wait_for(future, timeout=30)
        finally:
            self._results.pop(request, None)

    async def label_input(self, session_id: str, item_id: str, last_only: bool = False) -> None:
        self._session(session_id, restarting_ok=True).replay.label(item_id, last_only)

    async def delete_item(self, session_id: str, item_id: str) -> None:
        """Recomputed from the item on, not evicted: the thinker rewinds to the item's turn
        and is sent the log from there without it, so the context is exactly that of a
        conversation that never had the item (eviction would leave its traces in the keys
        and values of what came after)."""
        session = self._session(session_id)
        if session.reply is not None:
            raise EngineError("a reply is in progress; delete items once it has ended")
        self._forget(session_id, session, item_id)

    async def discard_reply(self, session_id: str, item_id: str) -> None:
        """The item-delete path (the thinker rewinds to the reply's turn and is sent the log
        from there without the reply): the turn's input and what came after it is one open
        turn again."""
        session = self._session(session_id)
        if session.reply is not None:
            raise EngineError("the reply is still in progress; cancel it and wait for its end")
        if session.replay.last_reply_item != item_id:
            raise EngineError(f"item {item_id} is not the last reply")
        self._forget(session_id, session, item_id)
        session.last_spoken = session.spoken_before

    def _forget(self, session_id: str, session: _Session, item_id: str) -> None:
        try:
            turn = session.replay.delete_item(item_id)
        except KeyError:
            if not session.replay.dropped_turns:
                return  # the model never had it (a reply cancelled before it began)
            raise EngineError(
                f"item {item_id} is not in the model's memory (the replay log dropped it, or "
                "it never reached the model)"
            ) from None
        self._send("thinker", p.Rewind(session_id, turn))
        for data in session.replay.messages(turn):
            self._out["thinker"].send(data)

    async def set_truncation(self, session_id: str, truncation: Truncation) -> None:
        session = self._session(session_id, restarting_ok=True)
        session.options.truncation = truncation  # a rebuild opens the session with it
        if self.ready:
            self._send(
                "thinker", p.SetTruncation(session_id, truncation.mode, truncation.retention_ratio)
            )

    async def respond(self, session_id: str, options: ReplyOptions) -> AsyncIterator[EngineEvent]:
        session = self._session(session_id)
        if session.reply is not None:
            raise EngineError("a reply is already in progress in this session")
        reply_id = uuid.uuid4().hex
        state = self._replies[reply_id] = _Reply(session_id)
        session.reply = reply_id
        session.replay.reply_started(reply_id, options.instructions, options.item_id)
        voice = options.voice or session.options.voice
        max_codes = options.max_codec_tokens or self.config.max_codec_tokens
        started = time.perf_counter()
        timings = StageTimings()
        text, text_tokens, input_tokens, audio_samples = "", 0, 0, 0
        token_ids: list[int] = []
        # for truncate_reply, filled below
        spoken = SpokenReply(0, 0, ended_itself=False, code_ms=self.family.codec_token_ms)
        codes: list[int] = []
        statuses: dict[str, str] = {}
        error: str | None = None
        waiting = {"thinker", "talker", "vocoder"} if options.output_audio else {"thinker"}
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
                self.family.talker_top_k if options.talker_top_k is None else options.talker_top_k,
                self.family.talker_top_p if options.talker_top_p is None else options.talker_top_p,
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
                        spoken.add_delta(len(msg.token_ids), msg.text)
                        yield TextDelta(msg.text, msg.token_ids)
                    case p.ThinkerDone():
                        waiting.discard("thinker")
                        statuses["thinker"] = msg.status
                        text, text_tokens = msg.text, msg.text_tokens
                        input_tokens, timings.prefill_ms = msg.input_tokens, msg.prefill_ms
                        token_ids = msg.token_ids
                        if not msg.talker_started:
                            waiting -= {"talker", "vocoder"}
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
                        codes = msg.codes
                        if not msg.vocoder_started:
                            waiting.discard("vocoder")
                    case p.VocoderDone():
                        waiting.discard("vocoder")
                        statuses["vocoder"] = msg.status
                        audio_samples = msg.audio_samples
                    case p.WorkerError():
                        error = msg.message  # the worker also ends the reply with a Done
                    case _ReplyEnded():
                        error, waiting = str(msg), set()
                        statuses["thinker"] = "failed"
        finally:
            if waiting and self.ready:  # the consumer stopped early: stop the workers too
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
        if self.family is QWEN2_5_OMNI:  # (Qwen3-Omni's Code2Wav ends short of a whole frame)
            assert audio_samples % SAMPLES_PER_CODE == 0 or status != "completed"
        # the talker stops at the codec cap without its end code: that speech was cut too
        steps = len(codes) // self.family.codebooks
        spoken.text_tokens, spoken.codes = text_tokens, steps
        spoken.ended_itself = statuses.get("talker") == "completed" and steps < max_codes
        session.spoken_before, session.last_spoken = session.last_spoken, spoken
        session.rate.add(spoken)
        yield ReplyDone(
            status, text, text_tokens, audio_samples, timings, input_tokens, error, token_ids, codes
        )

    def _notify(self, session: _Session, message: str) -> None:
        """A problem found outside the session's calls (input the thinker could not use, a
        worker restart): pushed to its `on_error` in a task of its own, so a slow handler
        never holds up the reader or the supervisor."""
        if session.options.on_error is None:
            return
        notice = asyncio.create_task(session.options.on_error(message))
        self._notices.add(notice)
        notice.add_done_callback(self._notice_done)

    def _notice_done(self, notice: asyncio.Task) -> None:
        self._notices.discard(notice)
        if not notice.cancelled() and notice.exception() is not None:
            log.error("a session's on_error failed", exc_info=notice.exception())

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

    def _session(self, session_id: str, restarting_ok: bool = False) -> _Session:
        if not (restarting_ok and self._restarting):
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
                    if msg.kv:
                        self.kv_stats[msg.worker] = msg.kv
                    if msg.worker == "thinker":
                        self.context_tokens = msg.contexts
                case p.Result():
                    future = self._results.get(msg.request)
                    if future is not None and not future.done():
                        future.set_result(msg.value)
                case _:
                    try:
                        self._route(msg)
                    except Exception:  # one bad message must not stop every call's replies
                        log.exception("routing a worker's %s failed", type(msg).__name__)

    def _route(self, msg: p.Msg) -> None:
        """A reply's message to its consumer (and its tokens to the session's replay log);
        an error outside any reply to its session's `on_error`."""
        session = self._sessions.get(getattr(msg, "session", None) or "")
        if session is not None:
            match msg:
                case p.TextOut():
                    session.replay.reply_tokens(msg.reply, msg.token_ids)
                case p.ThinkerDone():
                    session.replay.reply_finished(msg.reply, msg.token_ids[: msg.text_tokens])
                case p.TurnDropped():
                    session.replay.drop_turn(msg.turn)
                    return
        reply_id = getattr(msg, "reply", None) or ""
        reply = self._replies.get(reply_id)
        if reply is not None:
            if not reply.deliver(msg):
                log.error("reply %s: %d messages unread; cancelling it", reply_id, REPLY_QUEUE_MAX)
                for name in WORKERS:
                    self._send(name, p.Cancel(reply.session, reply_id))
                reply.end(
                    f"the reply was cancelled: its reader left {REPLY_QUEUE_MAX} messages unread"
                )
        elif isinstance(msg, p.WorkerError):
            log.error("%s worker: %s (session %s)", msg.worker, msg.message, msg.session)
            if session is not None:
                self._notify(session, f"the {msg.worker} worker: {msg.message}")


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
    CPU; another device: every worker on it; `talker_device` puts the talker and the vocoder
    elsewhere."""
    import torch

    if device != "auto":
        thinker = talker = device
    elif not torch.cuda.is_available():
        thinker = talker = "cpu"
    else:
        thinker, talker = "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    return thinker, talker_device or talker


def _open_message(session_id: str, options: SessionOptions, first_exchange: int) -> p.OpenSession:
    t = options.truncation
    return p.OpenSession(
        session_id, options.instructions, t.mode, t.retention_ratio, first_exchange
    )


def _rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise EngineError(f"expected a uint8 HxWx3 RGB image, got {rgb.dtype} {rgb.shape}")
    return rgb


def _seconds(timestamp: float | None) -> float | None:
    """A media timestamp as a finite float (numpy scalars and ints too); bad ones refused."""
    if timestamp is None:
        return None
    seconds = float(timestamp)
    if not math.isfinite(seconds):
        raise EngineError(f"a media timestamp must be a finite number of seconds, got {timestamp}")
    return seconds


def _solver_for(solver: str, device: str) -> str:
    if solver != "auto":
        return solver
    return "rk4" if device.startswith("cuda") else "euler"


def _dtype_for(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"
