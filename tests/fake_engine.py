"""A scripted Engine for tests: deterministic replies, a tone for speech, a log of every call.

Replies are built from what the turn held, so tests can check that input got through and
that the conversation is remembered:
    "Reply 2. You said: hello. I heard 1.9 seconds of speech. I see a 64x48 image.
     Earlier you said: what is two plus two. and so on ..."
Each word is one text token, spoken over `codes_per_char` codec steps of 20 ms per character
(a fast talker: the default is ~115 ms a word, real speech takes 250-350 ms), sent in chunks
of `tokens_per_chunk` tokens. `cancel` stops a reply within one step, and `truncate_reply`
keeps the words the heard audio spoke, by the engine's own rule (omni/engine/heard.py) with
this fake's known speaking rate.

It also checks the contract's "one call at a time per session" (cancel excepted) and
records any overlap in `violations`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from omni.engine.api import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_CODE,
    AudioChunk,
    EngineError,
    EngineEvent,
    ReplyDone,
    ReplyOptions,
    SessionOptions,
    StageTimings,
    TextDelta,
    Truncation,
)
from omni.engine.heard import SpokenReply, heard_tokens


@dataclass
class FakeTurn:
    audio_samples: int = 0
    audio: list[np.ndarray] = field(default_factory=list)
    frames: int = 0
    frame_times: list[float | None] = field(default_factory=list)  # each frame's timestamp
    audio_times: list[float | None] = field(default_factory=list)  # each audio append's
    images: list[tuple[int, int]] = field(default_factory=list)  # (width, height)
    texts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.texts:
            return " ".join(self.texts)
        return f"{self.audio_samples / INPUT_SAMPLE_RATE:.1f} seconds of speech"

    def tokens(self) -> int:
        return (
            len(" ".join(self.texts).split())
            + self.audio_samples * 25 // INPUT_SAMPLE_RATE
            + 256 * (len(self.images) + self.frames)
        )


@dataclass
class FakeConversation:
    options: SessionOptions
    turn: FakeTurn = field(default_factory=FakeTurn)
    history: list[tuple[FakeTurn, list[str]]] = field(
        default_factory=list
    )  # (user turn, reply tokens)
    replies: list[ReplyOptions] = field(default_factory=list)
    spoken: SpokenReply | None = None  # the last reply, for truncate_reply
    codes_per_token: float = 1.0  # the last reply's speaking rate
    cancelled: bool = False
    closed: bool = False
    busy: str | None = None
    labels: list[str] = field(default_factory=list)  # label_input's item ids, in order
    deleted: list[str] = field(default_factory=list)  # delete_item's item ids, in order
    discarded: list[str] = field(default_factory=list)  # discard_reply's item ids, in order

    def reply_text(self, index: int = -1) -> str:
        return "".join(self.history[index][1])


class FakeEngine:
    def __init__(
        self,
        *,
        token_delay: float = 0.01,
        prefill_delay: float = 0.01,
        tokens_per_chunk: int = 4,
        filler_tokens: int = 40,
        codes_per_char: int = 1,
    ) -> None:
        self.token_delay = token_delay
        self.prefill_delay = prefill_delay
        self.tokens_per_chunk = tokens_per_chunk
        self.filler_tokens = filler_tokens
        self.codes_per_char = codes_per_char
        self.sessions: dict[str, FakeConversation] = {}
        self.closed: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.fail_next_reply: str | None = None

    # -- bookkeeping

    def _enter(self, name: str, session_id: str) -> FakeConversation:
        self.calls.append((name, session_id))
        conversation = self.sessions.get(session_id)
        if conversation is None or conversation.closed:
            raise EngineError(f"no session {session_id}")
        if conversation.busy is not None:
            self.violations.append(f"{name} while {conversation.busy} ({session_id})")
        conversation.busy = name
        return conversation

    @staticmethod
    def _leave(conversation: FakeConversation) -> None:
        conversation.busy = None

    def conversation(self, session_id: str | None = None) -> FakeConversation:
        """A session's conversation (the only one when not named)."""
        if session_id is None:
            (session_id,) = self.sessions
        return self.sessions[session_id]

    # -- the Engine protocol

    async def open_session(self, session_id: str, options: SessionOptions) -> None:
        self.calls.append(("open_session", session_id))
        self.sessions[session_id] = FakeConversation(options)

    async def close_session(self, session_id: str) -> None:
        self.calls.append(("close_session", session_id))
        self.sessions[session_id].closed = True  # kept, so tests can look after the call
        self.closed.append(session_id)

    async def append_audio(
        self, session_id: str, pcm: np.ndarray, timestamp: float | None = None
    ) -> None:
        conversation = self._enter("append_audio", session_id)
        assert pcm.dtype == np.float32 and pcm.ndim == 1
        conversation.turn.audio_samples += len(pcm)
        conversation.turn.audio.append(pcm)
        conversation.turn.audio_times.append(timestamp)
        await asyncio.sleep(0)
        self._leave(conversation)

    async def append_video_frame(
        self, session_id: str, rgb: np.ndarray, timestamp: float | None = None
    ) -> None:
        conversation = self._enter("append_video_frame", session_id)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        conversation.turn.frames += 1
        conversation.turn.frame_times.append(timestamp)
        self._leave(conversation)

    async def add_image(self, session_id: str, rgb: np.ndarray) -> None:
        conversation = self._enter("add_image", session_id)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        conversation.turn.images.append((rgb.shape[1], rgb.shape[0]))
        self._leave(conversation)

    async def add_text(self, session_id: str, text: str) -> None:
        conversation = self._enter("add_text", session_id)
        conversation.turn.texts.append(text)
        self._leave(conversation)

    async def clear_user_turn(self, session_id: str) -> None:
        conversation = self._enter("clear_user_turn", session_id)
        conversation.turn = FakeTurn()
        self._leave(conversation)

    def _script(self, conversation: FakeConversation) -> list[str]:
        turn = conversation.turn
        words = [f"Reply {len(conversation.history) + 1}."]
        if turn.texts:
            words += ["You", "said:", *" ".join(turn.texts).split()]
        if turn.audio_samples:
            words += (
                f"I heard {turn.audio_samples / INPUT_SAMPLE_RATE:.1f} seconds of speech.".split()
            )
        for width, height in turn.images:
            words += f"I see a {width}x{height} image.".split()
        if turn.frames:
            words += f"I saw {turn.frames} camera frames.".split()
        if conversation.history:
            words += ["Earlier", "you", "said:", *conversation.history[0][0].summary().split()]
        words += ["and", "so", "on"] * (self.filler_tokens // 3)
        return [word + " " for word in words]

    async def respond(self, session_id: str, options: ReplyOptions) -> AsyncIterator[EngineEvent]:
        conversation = self._enter("respond", session_id)
        conversation.cancelled = False
        conversation.replies.append(options)
        start = time.monotonic()

        def ms() -> float:
            return (time.monotonic() - start) * 1000.0

        timings = StageTimings()
        script = self._script(conversation)[: options.max_text_tokens]
        turn, conversation.turn = conversation.turn, FakeTurn()
        tokens: list[str] = []
        conversation.history.append((turn, tokens))
        samples = 0
        codes = 0  # for the words so far
        script_codes = sum(map(len, script)) * self.codes_per_char
        conversation.codes_per_token = script_codes / max(1, len(script))
        status: Literal["completed", "cancelled"] = "completed"
        tone = (
            np.sin(np.arange(SAMPLES_PER_CODE) * 2 * np.pi * 440 / OUTPUT_SAMPLE_RATE) * 8000
        ).astype(np.int16)
        try:
            await asyncio.sleep(self.prefill_delay)
            timings.prefill_ms = ms()
            if self.fail_next_reply:
                message, self.fail_next_reply = self.fail_next_reply, None
                raise EngineError(message)
            for index, word in enumerate(script):
                await asyncio.sleep(self.token_delay)
                if conversation.cancelled:
                    status = "cancelled"
                    break
                tokens.append(word)
                codes += len(word) * self.codes_per_char
                timings.first_text_ms = timings.first_text_ms or ms()
                yield TextDelta(word, [index])
                done = index + 1 == len(script)
                if options.output_audio and (done or (index + 1) % self.tokens_per_chunk == 0):
                    steps = codes - samples // SAMPLES_PER_CODE
                    timings.first_codec_ms = timings.first_codec_ms or ms()
                    timings.first_audio_ms = timings.first_audio_ms or ms()
                    yield AudioChunk(np.tile(tone, steps), samples)
                    samples += steps * SAMPLES_PER_CODE
            timings.total_ms = ms()
            spoken = SpokenReply(len(tokens), samples // SAMPLES_PER_CODE, status == "completed")
            for word in tokens:
                spoken.add_delta(1, word)
            conversation.spoken = spoken
            yield ReplyDone(status, "".join(tokens), len(tokens), samples, timings, turn.tokens())
        finally:
            self._leave(conversation)

    async def cancel(self, session_id: str) -> None:
        self.calls.append(("cancel", session_id))
        if session_id in self.sessions:
            self.sessions[session_id].cancelled = True

    async def truncate_reply(self, session_id: str, audio_ms: int) -> int:
        conversation = self.sessions.get(session_id)
        spoken = conversation.spoken if conversation is not None else None
        keep = 0 if spoken is None else heard_tokens(spoken, audio_ms, conversation.codes_per_token)
        return await self.keep_reply_tokens(session_id, keep, "truncate_reply")

    async def keep_reply_tokens(
        self, session_id: str, tokens: int, call: str = "keep_reply_tokens"
    ) -> int:
        conversation = self._enter(call, session_id)
        try:
            if not conversation.history:
                raise EngineError("no reply to truncate")
            kept = conversation.history[-1][1]
            del kept[tokens:]
            return len(kept)
        finally:
            self._leave(conversation)

    async def label_input(self, session_id: str, item_id: str, last_only: bool = False) -> None:
        conversation = self._enter("label_input", session_id)
        conversation.labels.append(item_id)
        self._leave(conversation)

    async def delete_item(self, session_id: str, item_id: str) -> None:
        """A reply's item forgets its words; any item is recorded in `deleted`."""
        conversation = self._enter("delete_item", session_id)
        conversation.deleted.append(item_id)
        for options, (_, tokens) in zip(conversation.replies, conversation.history):
            if options.item_id == item_id:
                tokens.clear()
        self._leave(conversation)

    async def discard_reply(self, session_id: str, item_id: str) -> None:
        """The last reply goes; its turn is open again, then the input sent since."""
        conversation = self._enter("discard_reply", session_id)
        try:
            if not conversation.replies or conversation.replies[-1].item_id != item_id:
                raise EngineError(f"item {item_id} is not the last reply")
            conversation.replies.pop()
            turn, _ = conversation.history.pop()
            since = conversation.turn
            turn.audio_samples += since.audio_samples
            turn.audio += since.audio
            turn.audio_times += since.audio_times
            turn.frames += since.frames
            turn.frame_times += since.frame_times
            turn.images += since.images
            turn.texts += since.texts
            conversation.turn = turn
            conversation.discarded.append(item_id)
        finally:
            self._leave(conversation)

    async def set_truncation(self, session_id: str, truncation: Truncation) -> None:
        conversation = self._enter("set_truncation", session_id)
        conversation.options.truncation = truncation
        self._leave(conversation)


@asynccontextmanager
async def fake_engine(**kwargs: object) -> AsyncIterator[FakeEngine]:
    """An engine factory in the shape `create_app(engine_factory=...)` takes."""
    yield FakeEngine(**kwargs)  # type: ignore[arg-type]
