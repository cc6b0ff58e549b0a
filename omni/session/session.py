"""A realtime call session: turns, barge-in, truncation and limits, whatever the transport.

Transports feed it and drain it (see outputs.py):
- `handle_message(text)` for each JSON client event (WebSocket, or a WebRTC data channel);
- `push_audio(pcm)` / `push_video_frame(rgb)` for media a transport decoded itself (WebRTC:
  16 kHz float32 mic audio, RGB camera frames); WebSocket appends end up in the same place;
- read `outbox` and send what comes out; call `close()` when the peer goes away. The outbox
  is bounded (outbox.py): a client that stops reading ends its session.

Its parts: `InputAudioBuffer` (the input buffer and server VAD), `EngineQueue` (engine calls one
at a time, in event order; only `engine.cancel` goes around it, so barge-in lands within one
model step), `Conversation` (the client's item ledger), one `Response` per reply and
`ItemTranscripts` (committed speech as text, beside the reply). The session ties them to the
protocol: which event does what, when a turn ends, what a barge-in cancels and how a reply is
truncated to what the caller heard.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import numpy as np

from omni.checkpoints.family import QWEN2_5_OMNI
from omni.engine.api import (
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_CODE,
    Engine,
    EngineError,
    SessionOptions,
)
from omni.engine.transcriber import Transcriber
from omni.logs import bind_response
from omni.metrics import Metrics
from omni.session import client_events as ce
from omni.session.config import SessionConfig, Shape, session_shape
from omni.session.conversation import Conversation, Item
from omni.session.engine_queue import EngineQueue, TurnInput
from omni.session.errors import RealtimeError, engine_error_code, new_id, quoted
from omni.session.images import decode_base64_image
from omni.session.input_buffer import DEFAULT_PAUSE_MS, InputAudioBuffer
from omni.session.offload import OFFLOAD_BYTES, off_loop
from omni.session.outbox import CLIENT_NOT_READING, Outbox
from omni.session.outputs import AudioOut, Closed, Playout
from omni.session.response import ReplyPlan, Response
from omni.session.shape import to_beta
from omni.session.speculation import Speculation
from omni.session.transcripts import ItemTranscripts
from omni.session.user_content import ItemCaps, user_content
from omni.session.wire_audio import b64decode, b64encode_pcm16
from omni.settings import Settings

log = logging.getLogger(__name__)

_EVENT_ID = re.compile(r'"event_id"\s*:\s*"([^"\\]{1,128})"')


def _engine_busy() -> RealtimeError:
    return RealtimeError(
        "engine_busy",
        "the model is behind on this session's input; this event was dropped, try again soon",
        type="server_error",
    )


def expiry_warning_lead(limit: float, warning: float) -> float:
    """Seconds before the session cap that the client is warned: `warning`, at most half the
    session (a short session is still warned, not at its start)."""
    return min(warning, limit / 2)


def _sniff_event_id(message: str) -> str | None:
    """The client's event_id from a message that will not be parsed (too big, or broken)."""
    found = _EVENT_ID.search(message)
    return found.group(1) if found else None


class RealtimeSession:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        *,
        model: str | None = None,
        shape: Shape = "ga",
        initial: ce.SessionIn | None = None,
        playout: Playout | None = None,
        transcriber: Transcriber | None = None,
        voices: tuple[str, ...] = QWEN2_5_OMNI.voices,
    ) -> None:
        self.id = new_id("sess")
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.shape = shape
        self.playout = playout
        self.outbox = Outbox(
            settings.max_outbox_bytes, settings.max_client_lag_seconds, self._client_not_reading
        )
        self.config = SessionConfig.from_settings(settings, model, voices)
        if initial is not None:
            self.config = self.config.updated(initial)
        self.conversation = Conversation()
        self.expires_at = int(time.time() + settings.max_session_seconds)
        self.closed = False
        self._started = False
        self._engine = EngineQueue(
            engine,
            self.id,
            self.emit_error,
            max_calls=settings.max_engine_calls,
            max_turn_bytes=settings.max_turn_input_bytes,
        )
        self._refusing: set[str] = set()  # media refused and said so; said again once it fits
        self._input = InputAudioBuffer(
            self._engine,
            self.config.input_format,
            settings.max_buffered_audio_seconds,
            self,
            self.emit_error,
            pause_ms=settings.speculative_pause_ms or DEFAULT_PAUSE_MS,
        )
        self._item_caps = ItemCaps.from_settings(settings)
        self._idle_frame: TurnInput | None = None  # latest camera frame while nobody talks
        self._frame_interval = 1.0 / settings.video_max_fps
        self._last_frame_at = -self._frame_interval
        self._transcripts = ItemTranscripts(transcriber, self.emit, metrics)
        self._responses: list[Response] = []  # running or queued, oldest first
        self._last_response: Response | None = None
        self._speculation: Speculation | None = None  # a reply started at a pause, held
        self._turn_misses = 0  # speculative replies discarded in the user turn in progress
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle

    async def start(self) -> None:
        """Open the engine's conversation and say session.created. Raises EngineError."""
        options = SessionOptions(
            voice=self.config.voice,
            instructions=self.config.instructions,
            on_error=self._engine_problem,
            truncation=self.config.truncation,
        )
        await self.engine.open_session(self.id, options)
        self._started = True
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()
        await self._input.configure(self.config.turn_detection)
        self._tasks = [asyncio.create_task(self._engine.run()), asyncio.create_task(self._expire())]
        await self.emit({"type": "session.created", "session": self._session_wire()})

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        await self._discard_speculation()
        await self._cancel_responses("client_cancelled")
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        await self._transcripts.close()
        if self._started:
            self.metrics.sessions_active.dec()
            try:
                await self.engine.close_session(self.id)
            except Exception:  # closing must finish; the engine logs its side
                log.exception("session %s: engine close_session failed", self.id)
        self.outbox.put_nowait(Closed(reason))

    async def _engine_problem(self, message: str) -> None:
        """The engine found a problem outside this session's calls: a worker restart (a reply
        in progress failed; the conversation is rebuilt), input the model could not use."""
        if not self.closed:
            code = engine_error_code(message)
            await self.emit_error(RealtimeError(code, message, type="server_error"))

    def _client_not_reading(self) -> None:
        # the outbox dropped what it held and kept an error saying why; end the session
        self.metrics.errors.labels(CLIENT_NOT_READING).inc()
        self._tasks.append(asyncio.create_task(self.close(CLIENT_NOT_READING)))

    async def _expire(self) -> None:
        """The session length cap: a `session.expiring` warning `lead` seconds before it (a
        custom event: clients that switch on `type` pass over it), then an error and a close."""
        limit = self.settings.max_session_seconds
        lead = expiry_warning_lead(limit, self.settings.session_expiry_warning_seconds)
        await asyncio.sleep(limit - lead)
        if lead > 0:
            await self.emit(
                {
                    "type": "session.expiring",
                    "expires_at": self.expires_at,
                    "seconds_left": lead,
                    "message": f"the session ends in {lead:g} s, at its {limit:g} s limit "
                    "(max_session_seconds)",
                }
            )
            await asyncio.sleep(lead)
        await self.emit_error(
            RealtimeError("session_expired", f"the session reached its {limit:g} s limit")
        )
        await self.close("session_expired")

    # -- output

    async def emit(self, event: dict[str, Any]) -> None:
        """Queue a server event (built GA-shaped) in the client's shape."""
        wire: dict[str, Any] | None = {"type": event["type"], "event_id": new_id("event"), **event}
        if self.shape == "beta":
            wire = to_beta(wire)  # type: ignore[arg-type]
        if wire is not None:
            self.outbox.put_nowait(wire)

    async def emit_error(self, error: RealtimeError) -> None:
        error.event_id = error.event_id or self._engine.event_id
        self.metrics.errors.labels(error.code).inc()
        await self.emit(error.to_event())

    async def _emit_audio(self, out: AudioOut) -> None:
        self.outbox.put_nowait(out)

    def render_audio(self, out: AudioOut) -> dict[str, Any]:
        """Reply audio as a WebSocket delta event, in the client's shape."""
        event = {
            "type": "response.output_audio.delta",
            "event_id": new_id("event"),
            "response_id": out.response_id,
            "item_id": out.item_id,
            "output_index": 0,
            "content_index": 0,
            "delta": b64encode_pcm16(out.pcm),
        }
        return (to_beta(event) or event) if self.shape == "beta" else event

    def _session_wire(self) -> dict[str, Any]:
        return self.config.to_wire(self.shape, self.id, self.expires_at)

    # -- input

    async def handle_message(self, message: str | bytes) -> None:
        """One client message; any problem becomes an `error` event and the session goes on."""
        if self.closed:
            return
        self._engine.event_id = None
        try:
            if isinstance(message, bytes):
                raise RealtimeError(
                    "invalid_event", "binary messages are not supported; send JSON text"
                )
            size = len(message) if message.isascii() else len(message.encode())
            cap = self.settings.max_message_bytes
            if size > cap:
                self._engine.event_id = _sniff_event_id(message)
                raise RealtimeError(
                    "message_too_large", f"the message is {size} bytes, over the {cap}-byte limit"
                )
            if self._engine.full:
                self._engine.event_id = _sniff_event_id(message)
                raise _engine_busy()
            depth = self.settings.max_json_depth
            try:
                if size > OFFLOAD_BYTES:
                    event = await off_loop(
                        self.settings.decode_threads, ce.decode_client_event, message, depth
                    )
                else:
                    event = ce.decode_client_event(message, depth)
            except RealtimeError as error:
                error.event_id = error.event_id or _sniff_event_id(message)
                raise
            self._engine.event_id = event.event_id
            await self._handlers[type(event)](self, event)
        except RealtimeError as error:
            await self.emit_error(error)
        except Exception:  # a bug must not end the call; the client hears a server error
            log.exception("session %s: handling a client event failed", self.id)
            await self.emit_error(
                RealtimeError("server_error", "internal error", type="server_error")
            )
        finally:
            self._engine.event_id = None

    async def push_audio(self, pcm: np.ndarray) -> None:
        """User audio as float32 16 kHz (a WebRTC mic track)."""
        if self.closed or not await self._media_fits("audio"):
            return
        try:
            await self._input.push(pcm)
        except RealtimeError as error:
            await self.emit_error(error)

    async def push_video_frame(self, rgb: np.ndarray, timestamp: float | None = None) -> None:
        """A camera frame (uint8 HxWx3); frames over `video_max_fps` are dropped, and while the
        caller is silent (server VAD) only the latest is kept, for the start of their speech.

        `timestamp`: its capture time in seconds after the first audio sample this session
        received, on that audio's clock (a WebRTC camera's, mapped by the gateway); the
        engine then places it by time, not by arrival (Engine.append_video_frame)."""
        now = time.monotonic()
        if self.closed or now - self._last_frame_at < self._frame_interval:
            return
        self._last_frame_at = now
        frame = TurnInput("frame", rgb, timestamp=timestamp)
        if self._input.detection is not None and not self._input.speaking:
            self._idle_frame = frame  # the turn starts with the latest view, sent on speech start
            return
        if await self._media_fits("frame", rgb.nbytes):
            self._engine.add(frame)

    async def _media_fits(self, kind: str, nbytes: int = 0) -> bool:
        """Whether media from a track can be taken now; said once per stretch of refusals,
        since a track pushes many times a second."""
        try:
            if self._engine.full:
                raise _engine_busy()
            self._engine.check_room(nbytes)
        except RealtimeError as error:
            if kind not in self._refusing:
                self._refusing.add(kind)
                await self.emit_error(error)
            return False
        self._refusing.discard(kind)
        return True

    # -- client events

    async def _session_update(self, event: ce.SessionUpdate) -> None:
        await self._discard_speculation()  # it was started with the old settings
        config = self.config.updated(event.session)
        self.shape = session_shape(event.session) or self.shape
        if config.truncation != self.config.truncation:
            self._engine.call(partial(self.engine.set_truncation, self.id, config.truncation))
        self.config = config
        await self._input.set_format(config.input_format)
        await self._input.configure(config.turn_detection)
        await self.emit({"type": "session.updated", "session": self._session_wire()})

    async def _append_audio(self, event: ce.InputAudioBufferAppend) -> None:
        if len(event.audio) > OFFLOAD_BYTES:
            data = await off_loop(self.settings.decode_threads, b64decode, event.audio, "audio")
        else:
            data = b64decode(event.audio, "audio")
        await self._input.append(data)

    async def _commit_buffer(self, event: ce.InputAudioBufferCommit) -> None:
        await self._discard_speculation()
        await self._commit(await self._input.stop_speech())

    async def _clear_buffer(self, event: ce.InputAudioBufferClear) -> None:
        await self._discard_speculation()
        await self._input.clear()
        if self._engine.uncommitted():
            self._engine.rebuild([i for i in self._engine.turn if i.item_id is not None])
        await self.emit({"type": "input_audio_buffer.cleared"})

    async def _append_image(self, event: ce.InputImageBufferAppend) -> None:
        if not self._input.received:  # Qwen-Omni-Realtime's rule: frames accompany speech
            raise RealtimeError(
                "image_before_audio", "append audio before the first image", param="image"
            )
        rgb = await off_loop(
            self.settings.decode_threads,
            decode_base64_image,
            event.image,
            "image",
            self.settings.image_max_pixels,
        )
        await self.push_video_frame(rgb)

    async def _create_item(self, event: ce.ConversationItemCreate) -> None:
        if event.previous_item_id not in (None, self.conversation.last_id):
            raise RealtimeError(
                "unsupported",
                "items can only be added at the end of the conversation",
                param="previous_item_id",
            )
        await self._discard_speculation()
        parts, inputs = await off_loop(
            self.settings.decode_threads,
            user_content,
            event.item,
            self.config.input_format,
            self._item_caps,
        )
        self._engine.check_room(sum(piece.nbytes for piece in inputs))
        new = Item("user", parts, id=event.item.id or new_id("item"))
        previous = self.conversation.add(new)
        for piece in inputs:
            piece.item_id = new.id
            self._engine.add(piece)
        await self._item_added(new, previous)

    async def _retrieve_item(self, event: ce.ConversationItemRetrieve) -> None:
        item = self.conversation.get(event.item_id)
        await self.emit({"type": "conversation.item.retrieved", "item": item.to_wire()})

    async def _truncate_item(self, event: ce.ConversationItemTruncate) -> None:
        item = self.conversation.get(event.item_id)
        if item.role != "assistant":
            raise RealtimeError(
                "invalid_value", "only assistant items can be truncated", param="item_id"
            )
        if event.content_index != 0:
            raise RealtimeError(
                "invalid_value",
                "assistant items have one content part (index 0)",
                param="content_index",
            )
        response = self._last_response
        if response is None or response.item is not item:
            raise RealtimeError(
                "unsupported", "only the latest assistant reply can be truncated", param="item_id"
            )
        await self._discard_speculation()
        if not response.plan.audio_out:
            raise RealtimeError(
                "invalid_value", "the item has no audio to truncate", param="item_id"
            )
        if not response.done:  # the caller stopped listening: stop talking
            await self._cancel_responses("client_cancelled")
        self._engine.call(partial(self._truncate, response, event.audio_end_ms))

    async def _delete_item(self, event: ce.ConversationItemDelete) -> None:
        """Any item: a pending user item leaves the pending turn; an item the model has (an
        older user item, any finished reply) leaves its memory (engine.delete_item)."""
        item = self.conversation.get(event.item_id)
        await self._discard_speculation()
        if any(r.item is item for r in self._responses):
            raise RealtimeError(
                "invalid_value",
                "the item's response is still in progress; cancel it or wait for response.done",
                param="item_id",
            )
        if any(i.item_id == item.id for i in self._engine.turn):
            self._engine.rebuild([i for i in self._engine.turn if i.item_id != item.id])
        else:
            self._engine.call(partial(self.engine.delete_item, self.id, item.id))
        self.conversation.remove(item.id)
        await self.emit({"type": "conversation.item.deleted", "item_id": item.id})

    async def _response_create(self, event: ce.ResponseCreate) -> None:
        await self._discard_speculation()
        await self._create_response(event.response)

    async def _response_cancel(self, event: ce.ResponseCancel) -> None:
        if not self._responses:
            raise RealtimeError(
                "response_cancel_not_active", "there is no response in progress to cancel"
            )
        if event.response_id and event.response_id not in {r.id for r in self._responses}:
            raise RealtimeError(
                "invalid_value",
                f"response {quoted(event.response_id)} is not in progress",
                param="response_id",
            )
        await self._interrupt("client_cancelled")

    async def _output_clear(self, event: ce.OutputAudioBufferClear) -> None:
        if self.playout is None:
            raise RealtimeError(
                "unsupported",
                "output_audio_buffer.clear is for WebRTC; over WebSocket the client owns playback",
            )
        await self._clear_playout()

    _handlers: dict[type, Callable[[RealtimeSession, Any], Awaitable[None]]] = {
        ce.SessionUpdate: _session_update,
        ce.InputAudioBufferAppend: _append_audio,
        ce.InputAudioBufferCommit: _commit_buffer,
        ce.InputAudioBufferClear: _clear_buffer,
        ce.InputImageBufferAppend: _append_image,
        ce.ConversationItemCreate: _create_item,
        ce.ConversationItemRetrieve: _retrieve_item,
        ce.ConversationItemTruncate: _truncate_item,
        ce.ConversationItemDelete: _delete_item,
        ce.ResponseCreate: _response_create,
        ce.ResponseCancel: _response_cancel,
        ce.OutputAudioBufferClear: _output_clear,
    }

    # -- turn-taking (InputAudioBuffer calls these)

    async def speech_started(self, item_id: str, audio_start_ms: int) -> None:
        detection = self.config.turn_detection
        await self.emit(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": audio_start_ms,
                "item_id": item_id,
            }
        )
        if detection is not None and detection.interrupt_response:
            await self._interrupt("turn_detected")
        if self._idle_frame is not None:
            if await self._media_fits("frame", self._idle_frame.nbytes):
                self._engine.add(self._idle_frame)
            self._idle_frame = None

    async def speech_stopped(self, item_id: str, audio_end_ms: int) -> None:
        turn_end = time.monotonic()
        await self.emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": audio_end_ms,
                "item_id": item_id,
            }
        )
        speculation = self._speculation
        if speculation is not None and speculation.item_id == item_id:
            self._speculation = None
            await self._commit(item_id, speculation)
            await self._confirm(speculation, turn_end)
            return
        await self._discard_speculation()
        await self._commit(item_id)
        detection = self.config.turn_detection
        if detection is not None and detection.create_response:
            await self._create_response(None, turn_end=turn_end, queue=True)

    async def speech_paused(self, item_id: str, silence_start_ms: int) -> None:
        """A pause within the caller's speech: start the reply now, held (speculation.py),
        when the session answers turns itself, nothing else is in the way, and the pause is
        shorter than the silence that ends the turn."""
        detection = self.config.turn_detection
        pause_ms = self.settings.speculative_pause_ms
        if (
            not pause_ms
            or detection is None
            or not detection.create_response
            or pause_ms >= detection.silence_duration_ms
            or self._speculation is not None
            or self._responses  # a reply still running or queued answers first
        ):
            return
        pieces = self._engine.uncommitted()
        if not any(piece.kind == "audio" for piece in pieces):
            return
        for piece in pieces:  # the turn so far is the reply's input (end_turn keeps it)
            piece.item_id = item_id
        self._engine.call(partial(self.engine.label_input, self.id, item_id))
        plan = ReplyPlan.from_request(self.config, None)
        item = Item("assistant", [], status="in_progress")
        speculation = Speculation(item_id, pieces, Response(plan, item))
        self._speculation = speculation
        # the item will be committed right before the reply's: it is the one before it
        self._engine.end_turn(partial(self._run_response, speculation.response, item_id, speculation))

    async def speech_resumed(self, item_id: str) -> None:
        """The caller went on after a pause: a held reply is discarded unheard."""
        if self._speculation is not None and self._speculation.item_id == item_id:
            await self._discard_speculation()

    async def _confirm(self, speculation: Speculation, turn_end: float) -> None:
        """A hit: the held reply is this turn's response; what it held goes out now."""
        response = speculation.response
        response.turn_end = turn_end
        response.speculation = "hit"
        self._turn_misses = 0
        self.conversation.add(response.item)
        self._responses.append(response)
        self._last_response = response
        self.metrics.speculations.labels("hit").inc()
        log.info("session %s: speculative reply %s hit", self.id, response.id)
        await speculation.release(self.emit, self._emit_audio)

    async def _discard_speculation(self) -> None:
        """A miss: stop the held reply, drop what it held, and (after it ended, in call
        order) have the engine forget it; the turn's input is pending again, as it was."""
        speculation, self._speculation = self._speculation, None
        if speculation is None:
            return
        speculation.discard()
        response = speculation.response
        response.cancel("speculation_discarded")
        if response.streaming:
            await self._cancel_engine()
        for piece in speculation.pieces:
            piece.item_id = None
        self._engine.turn = speculation.pieces + self._engine.turn
        self._turn_misses += 1
        self._engine.call(partial(self._forget_speculation, response))

    async def _forget_speculation(self, response: Response) -> None:
        if response.engine_asked:
            await self.engine.discard_reply(self.id, response.item.id)
        done = response.result
        self.metrics.speculations.labels("miss").inc()
        if done is not None:
            discarded = self.metrics.speculation_discarded
            discarded.labels("text_tokens").inc(done.text_tokens)
            discarded.labels("codec_frames").inc(done.audio_samples // SAMPLES_PER_CODE)
            discarded.labels("seconds").inc((done.timings.total_ms or 0.0) / 1000)
        log.info(
            "session %s: speculative reply %s missed (%d text tokens, %d audio samples "
            "discarded)",
            self.id,
            response.id,
            done.text_tokens if done else 0,
            done.audio_samples if done else 0,
        )

    async def _commit(self, item_id: str | None, speculation: Speculation | None = None) -> None:
        """Commit the pending input as a user item; after a speculative reply (a hit) the item
        is the input that reply was started on, and the silence since is let go."""
        await self._input.end_of_input()
        pending = self._engine.uncommitted()
        if speculation is not None:
            self._engine.rebuild([])  # the silence after the pause: not the next turn's start
            pending = speculation.pieces + pending
        if not any(i.kind == "audio" for i in pending):
            raise RealtimeError(
                "input_audio_buffer_commit_empty",
                "the input audio buffer is empty; append audio first",
            )
        item = Item(
            "user", [{"type": "input_audio", "transcript": None}], id=item_id or new_id("item")
        )
        if speculation is None:
            for piece in pending:
                piece.item_id = item.id
            self._engine.call(partial(self.engine.label_input, self.id, item.id))
        self._input.committed()
        previous = self.conversation.add(item)
        await self.emit(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item.id,
                "previous_item_id": previous,
            }
        )
        await self._item_added(item, previous)
        if self.config.transcription is not None:  # beside the reply, never before it
            audio = [piece.data for piece in pending if piece.kind == "audio"]
            self._transcripts.start(item, np.concatenate(audio), self.config.transcription)

    async def _item_added(self, item: Item, previous: str | None) -> None:
        await self.emit(
            {
                "type": "conversation.item.added",
                "previous_item_id": previous,
                "item": item.to_wire(),
            }
        )
        await self.emit(
            {"type": "conversation.item.done", "previous_item_id": previous, "item": item.to_wire()}
        )

    # -- responses and barge-in

    async def _create_response(
        self, request: ce.ResponseIn | None, *, turn_end: float | None = None, queue: bool = False
    ) -> None:
        if self._responses and not queue:
            raise RealtimeError(
                "conversation_already_has_active_response",
                f"response {self._responses[0].id} is still in progress; "
                "cancel it or wait for response.done",
            )
        plan = ReplyPlan.from_request(self.config, request)
        item = Item("assistant", [], status="in_progress")
        previous = self.conversation.add(item)
        response = Response(plan, item, turn_end=turn_end)
        if self.settings.speculative_pause_ms and turn_end is not None:
            response.speculation = "miss" if self._turn_misses else "none"
        self._turn_misses = 0
        self._responses.append(response)
        self._last_response = response
        self._engine.end_turn(partial(self._run_response, response, previous))

    async def _run_response(
        self, response: Response, previous: str | None, held: Speculation | None = None
    ) -> None:
        """Run a reply; `held`: a speculative one, its output held until the turn is decided."""
        emit, emit_audio = (self.emit, self._emit_audio) if held is None else (held.emit, held.emit_audio)
        try:
            with bind_response(response.id):  # log lines of this reply carry its id
                await response.run(self.engine, self.id, previous, emit, emit_audio)
            if held is not None:  # a short reply can end before its turn does
                await held.decided()
        finally:
            if response in self._responses:
                self._responses.remove(response)
        if held is not None and held.state != "released":
            return  # discarded (or still undecided at close): no response to count
        self.metrics.responses.labels(response.status).inc()
        for stage, ms in response.timings_ms().items():
            self.metrics.observe_stage_ms(stage.removesuffix("_ms"), ms)

    async def _interrupt(self, reason: str) -> None:
        """The caller spoke over the reply (or cancelled it): stop generating and playing."""
        await self._cancel_responses(reason)
        if self.playout is not None:
            await self._clear_playout()

    async def _cancel_responses(self, reason: str) -> None:
        for response in self._responses:
            response.cancel(reason)
        if self._responses and self._responses[0].streaming:
            await self._cancel_engine()

    async def _cancel_engine(self) -> None:
        """Stop the engine's reply for this session now (around the call queue: barge-in)."""
        try:
            await self.engine.cancel(self.id)
        except EngineError as exc:
            log.warning("session %s: engine cancel failed: %s", self.id, exc)

    async def _clear_playout(self) -> None:
        assert self.playout is not None
        played = self.playout.clear()
        if played is None:
            return
        await self.emit({"type": "output_audio_buffer.cleared", "response_id": played.response_id})
        response = self._last_response
        if response is not None and response.item.id == played.item_id:
            # a track cannot have played more than it was given
            heard = min(
                played.audio_end_ms, response.item.audio_samples * 1000 // OUTPUT_SAMPLE_RATE
            )
            self._engine.call(partial(self._truncate, response, heard))

    async def _truncate(self, response: Response, audio_end_ms: int, announce: bool = True) -> None:
        """After the reply has ended: keep what the caller heard, in the engine and the item."""
        produced_ms = response.item.audio_samples * 1000 // OUTPUT_SAMPLE_RATE
        if audio_end_ms > produced_ms:
            raise RealtimeError(
                "invalid_value",
                f"audio_end_ms {audio_end_ms} is past the end of the item's audio "
                f"({produced_ms} ms)",
                param="audio_end_ms",
            )
        response.truncated(await self.engine.truncate_reply(self.id, audio_end_ms), audio_end_ms)
        if announce:
            await self.emit(
                {
                    "type": "conversation.item.truncated",
                    "item_id": response.item.id,
                    "content_index": 0,
                    "audio_end_ms": audio_end_ms,
                }
            )
