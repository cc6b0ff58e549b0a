"""One assistant response: the engine's reply stream turned into OpenAI's event sequence.

    response.created → response.output_item.added → conversation.item.added
    → response.content_part.added → (output_audio_transcript | output_text).delta ...
      with output_audio.delta ... → *.done → content_part.done → output_item.done
    → conversation.item.done → response.done (status, usage, metadata with stage timings)

Once cancelled, nothing more reaches the client (not even deltas the engine still yields
before it stops), so a client that stopped playback on `speech_started` hears no stray audio.
The item's transcript is the text that was sent; after a cancel or a truncation it is the
text of the tokens the engine kept, the tokens its heard audio spoke (omni/engine/heard.py;
`text_for_tokens` maps the kept-token count back to text, so transcript, model context and
`conversation.item.truncated` agree).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from omni.engine.api import (
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_CODE,
    AudioChunk,
    Engine,
    EngineError,
    ReplyDone,
    ReplyOptions,
    TextDelta,
)
from omni.session.client_events import ResponseIn
from omni.session.config import (
    Modality,
    SessionConfig,
    check_output_format,
    max_tokens,
    normalize_voice,
    output_modalities,
)
from omni.session.conversation import Item
from omni.session.errors import RealtimeError, engine_error_code, new_id
from omni.session.outputs import AudioOut
from omni.session.wire_audio import parse_beta_format, parse_ga_format

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
EmitAudio = Callable[[AudioOut], Awaitable[None]]


@dataclass(frozen=True)
class ReplyPlan:
    """A response's settings: the session's, with this response.create's overrides."""

    modalities: tuple[Modality, ...]
    voice: str
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    seed: int | None

    @classmethod
    def from_request(cls, config: SessionConfig, r: ResponseIn | None) -> ReplyPlan:
        plan = cls(
            config.modalities,
            config.voice,
            config.instructions,
            config.max_output_tokens,
            {},
            config.seed,
        )
        if r is None:
            return plan
        if r.conversation not in (None, "auto"):
            raise RealtimeError(
                "unsupported",
                "out-of-band responses (conversation != 'auto') are not supported",
                param="response.conversation",
            )
        if r.input is not None:
            raise RealtimeError(
                "unsupported", "custom response input is not supported", param="response.input"
            )
        new: dict[str, Any] = {}
        if r.instructions is not None:
            new["instructions"] = r.instructions
        for field in ("output_modalities", "modalities"):
            if getattr(r, field):
                new["modalities"] = output_modalities(getattr(r, field))
        voice, param = r.voice, "response.voice"
        if r.audio and r.audio.output:
            if r.audio.output.format is not None:
                fmt_param = "response.audio.output.format"
                check_output_format(
                    parse_ga_format(r.audio.output.format.model_dump(exclude_none=True), fmt_param),
                    fmt_param,
                )
            if r.audio.output.voice:
                voice, param = r.audio.output.voice, "response.audio.output.voice"
        if r.output_audio_format:
            fmt_param = "response.output_audio_format"
            check_output_format(parse_beta_format(r.output_audio_format, fmt_param), fmt_param)
        if voice:
            new["voice"] = normalize_voice(voice, param, config.voices)
        for field in ("max_output_tokens", "max_response_output_tokens"):
            if field in r.model_fields_set:
                new["max_output_tokens"] = max_tokens(getattr(r, field))
        if r.metadata:
            new["metadata"] = dict(r.metadata)
        return replace(plan, **new)

    @property
    def audio_out(self) -> bool:
        return "audio" in self.modalities

    def reply_options(self) -> ReplyOptions:
        options = ReplyOptions(
            output_audio=self.audio_out,
            voice=self.voice,
            instructions=self.instructions,
            seed=self.seed,
        )
        if self.max_output_tokens is not None:
            options.max_text_tokens = self.max_output_tokens
        return options


class Response:
    def __init__(self, plan: ReplyPlan, item: Item, *, turn_end: float | None = None) -> None:
        self.id = new_id("resp")
        self.plan = plan
        self.item = item
        self.turn_end = turn_end  # monotonic time the VAD ended the user's turn, if it did
        self.cancel_reason: str | None = None
        self.streaming = False  # inside engine.respond: a cancel must reach the engine
        self.status = "in_progress"
        self.text = ""
        self.result: ReplyDone | None = None
        self.first_audio_at: float | None = None
        # with speculative replies on: "hit" (started at the caller's pause), "miss" (one or
        # more were started and discarded this turn) or "none"; in response.done's metadata
        self.speculation: str | None = None
        self._deltas: list[tuple[int, str]] = []  # (tokens so far including this delta, its text)
        self._engine_asked = False

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def engine_asked(self) -> bool:
        """Whether the engine was asked for this reply (a cancel may come before)."""
        return self._engine_asked

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None and not self.done:
            self.cancel_reason = reason

    def text_for_tokens(self, tokens: int) -> str:
        return "".join(text for upto, text in self._deltas if upto <= tokens)

    def truncated(self, kept_tokens: int, audio_end_ms: int) -> None:
        """The engine kept `kept_tokens` of this reply: the item keeps the matching text."""
        self.text = self.text_for_tokens(kept_tokens)
        self.item.audio_samples = min(
            self.item.audio_samples, audio_end_ms * OUTPUT_SAMPLE_RATE // 1000
        )
        self.item.content = [self._content()]

    # -- the event sequence

    def _ref(self) -> dict[str, Any]:
        """Where a content event points: this response's only item and content part."""
        return {
            "response_id": self.id,
            "item_id": self.item.id,
            "output_index": 0,
            "content_index": 0,
        }

    def _part(self) -> dict[str, Any]:
        return (
            {"type": "audio", "transcript": self.text}
            if self.plan.audio_out
            else {"type": "text", "text": self.text}
        )

    def _content(self) -> dict[str, Any]:
        if self.plan.audio_out:
            return {"type": "output_audio", "transcript": self.text}
        return {"type": "output_text", "text": self.text}

    def to_wire(self) -> dict[str, Any]:
        response: dict[str, Any] = {
            "id": self.id,
            "object": "realtime.response",
            "status": self.status,
            "status_details": None,
            "output": [self.item.to_wire()] if self.done else [],
            "output_modalities": list(self.plan.modalities),
            "audio": {
                "output": {
                    "format": {"type": "audio/pcm", "rate": OUTPUT_SAMPLE_RATE},
                    "voice": self.plan.voice,
                }
            },
            "max_output_tokens": self.plan.max_output_tokens or "inf",
            "metadata": self.plan.metadata or None,
            "usage": None,
        }
        if self.result is not None:
            response["status_details"] = self._status_details(self.result)
            response["usage"] = self._usage(self.result)
            response["metadata"] = {**self.plan.metadata, **self.timings_ms(as_text=True)}
            if self.speculation is not None:
                response["metadata"]["speculation"] = self.speculation
        return response

    def _status_details(self, done: ReplyDone) -> dict[str, Any] | None:
        if self.status == "cancelled":
            return {"type": "cancelled", "reason": self.cancel_reason}
        if self.status == "failed":
            return {
                "type": "failed",
                "error": {
                    "type": "server_error",
                    "code": engine_error_code(done.error),
                    "message": done.error,
                },
            }
        return None

    @staticmethod
    def _usage(done: ReplyDone) -> dict[str, Any]:
        audio_tokens = done.audio_samples // SAMPLES_PER_CODE
        output = done.text_tokens + audio_tokens
        return {
            "total_tokens": done.input_tokens + output,
            "input_tokens": done.input_tokens,
            "output_tokens": output,
            "input_token_details": {"cached_tokens": 0},
            "output_token_details": {"text_tokens": done.text_tokens, "audio_tokens": audio_tokens},
        }

    def timings_ms(self, as_text: bool = False) -> dict[str, Any]:
        """Stage timings of this turn; strings for response metadata (OpenAI's type)."""
        timings = self.result.timings.as_dict() if self.result is not None else {}
        if self.turn_end is not None and self.first_audio_at is not None:
            timings["vad_end_to_first_audio_ms"] = (self.first_audio_at - self.turn_end) * 1000.0
        if as_text:
            return {k: f"{v:.1f}" for k, v in timings.items() if v is not None}
        return timings

    async def run(
        self,
        engine: Engine,
        session_id: str,
        previous_item_id: str | None,
        emit: Emit,
        emit_audio: EmitAudio,
    ) -> ReplyDone:
        await emit({"type": "response.created", "response": self.to_wire()})
        await emit(
            {
                "type": "response.output_item.added",
                "response_id": self.id,
                "output_index": 0,
                "item": self.item.to_wire(),
            }
        )
        await emit(
            {
                "type": "conversation.item.added",
                "previous_item_id": previous_item_id,
                "item": self.item.to_wire(),
            }
        )
        await emit({"type": "response.content_part.added", **self._ref(), "part": self._part()})

        done = await self._stream(engine, session_id, emit, emit_audio)
        self.result = done
        # a reply that ended before the cancel landed still had its tail withheld: cancelled
        self.status = "cancelled" if self.cancel_reason and done.status != "failed" else done.status
        self.item.status = "completed" if self.status == "completed" else "incomplete"
        self.item.content = [self._content()]
        if self.status == "cancelled" and self.plan.audio_out and self._engine_asked:
            # the thinker runs ahead of the voice: keep in the model's memory (and in the
            # item) only the words whose audio was sent; a client truncate can cut further
            audio_ms = self.item.audio_samples * 1000 // OUTPUT_SAMPLE_RATE
            try:
                self.truncated(await engine.truncate_reply(session_id, audio_ms), audio_ms)
            except EngineError as exc:
                log.warning("response %s: truncating the cancelled reply failed: %s", self.id, exc)
        elif self.status == "cancelled" and self._engine_asked and done.status != "failed":
            # text only: the model keeps the tokens whose text was sent, and no more
            sent = self._deltas[-1][0] if self._deltas else 0
            try:
                self.truncated(await engine.keep_reply_tokens(session_id, sent), 0)
            except EngineError as exc:
                log.warning("response %s: cutting the cancelled reply failed: %s", self.id, exc)

        if self.plan.audio_out:
            await emit({"type": "response.output_audio.done", **self._ref()})
            await emit(
                {
                    "type": "response.output_audio_transcript.done",
                    **self._ref(),
                    "transcript": self.text,
                }
            )
        else:
            await emit({"type": "response.output_text.done", **self._ref(), "text": self.text})
        await emit({"type": "response.content_part.done", **self._ref(), "part": self._part()})
        await emit(
            {
                "type": "response.output_item.done",
                "response_id": self.id,
                "output_index": 0,
                "item": self.item.to_wire(),
            }
        )
        await emit({"type": "conversation.item.done", "item": self.item.to_wire()})
        await emit({"type": "response.done", "response": self.to_wire()})
        return done

    async def _stream(
        self, engine: Engine, session_id: str, emit: Emit, emit_audio: EmitAudio
    ) -> ReplyDone:
        if self.cancel_reason:  # cancelled before it started: the engine never hears of it
            return ReplyDone("cancelled", "", 0, 0)
        delta_type = (
            "response.output_audio_transcript.delta"
            if self.plan.audio_out
            else "response.output_text.delta"
        )
        tokens = 0
        done: ReplyDone | None = None
        error = "the engine ended the reply without a ReplyDone"
        self.streaming = self._engine_asked = True
        options = self.plan.reply_options()
        options.item_id = self.item.id  # so the engine can forget it (conversation.item.delete)
        stream = engine.respond(session_id, options)
        try:
            # read to the end (ReplyDone is last) so the engine's reply is over before the next call
            async for event in stream:
                if isinstance(event, ReplyDone):
                    done = event
                elif isinstance(event, TextDelta):
                    # every delta is in the ledger, withheld ones too: the model keeps the
                    # tokens its audio spoke, so a truncation may keep some the client never got
                    tokens += len(event.token_ids)
                    self._deltas.append((tokens, event.text))
                    if self.cancel_reason or done is not None:
                        continue
                    self.text += event.text
                    if event.text:
                        await emit({"type": delta_type, **self._ref(), "delta": event.text})
                elif self.cancel_reason or done is not None:
                    continue
                elif isinstance(event, AudioChunk) and self.plan.audio_out and len(event.pcm):
                    if self.first_audio_at is None:
                        self.first_audio_at = time.monotonic()
                    await emit_audio(
                        AudioOut(self.id, self.item.id, event.pcm, self.item.audio_samples)
                    )
                    self.item.audio_samples += len(event.pcm)
        except EngineError as exc:
            error = str(exc)
        except Exception:  # the session outlives a broken reply; the log has the traceback
            log.exception("response %s failed", self.id)
            error = "internal error while generating the reply"
        finally:
            self.streaming = False
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return done or ReplyDone("failed", self.text, tokens, self.item.audio_samples, error=error)
