"""What the rest of the service sees of the engine: options in, events out.

The session layer (turns, barge-in) talks to an `Engine` only through this module, so it can
be driven by the real multi-process engine or by a scripted fake in unit tests.

Audio in is mono float32 at 16 kHz (the thinker's rate); audio out is mono int16 at 24 kHz
(the vocoder's rate). Resampling to and from the wire formats is the gateway's job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np


INPUT_SAMPLE_RATE = 16_000
OUTPUT_SAMPLE_RATE = 24_000
# one codec token is 20 ms of speech: 480 samples at 24 kHz
SAMPLES_PER_CODE = 480
# how an engine error that is the context budget's begins (a client sees it as the error code)
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass(frozen=True)
class Truncation:
    """OpenAI's `session.truncation`, for the session's context budget: "auto" drops the
    oldest content it must when the budget is reached, "retention_ratio" keeps that share of
    the droppable content then (dropping more at once, so drops come seldom), "disabled"
    refuses input past the budget (a context_length_exceeded error)."""

    mode: Literal["auto", "disabled", "retention_ratio"] = "auto"
    retention_ratio: float = 1.0


@dataclass
class SessionOptions:
    voice: str | None = None  # one of the checkpoint family's voices; None: its first (default)
    # extra system text; the model's own speech system prompt always comes first
    instructions: str | None = None
    # problems found outside the session's calls (input the model could not use, a worker
    # restart), pushed as they are found; None: only logged
    on_error: Callable[[str], Awaitable[None]] | None = None
    truncation: Truncation = field(default_factory=Truncation)


@dataclass
class ReplyOptions:
    output_audio: bool = True
    voice: str | None = None  # None: the session's voice
    # new instructions from this reply on (a system turn before it); None keeps the current ones
    instructions: str | None = None
    greedy: bool = False  # greedy thinker and talker (tests, benchmarks)
    max_text_tokens: int = 1024
    max_codec_tokens: int | None = None  # None: the checkpoint preset's default
    min_codec_tokens: int = 0  # suppress the talker's end until this many codes (benchmarks)
    min_text_tokens: int = 0  # suppress the thinker's end until this many tokens (benchmarks)
    # talker sampling, transformers' defaults (top k and p: None, the family's)
    talker_top_k: int | None = None
    talker_top_p: float | None = None
    talker_temperature: float = 0.9
    talker_repetition_penalty: float = 1.05
    seed: int | None = None
    item_id: str | None = None  # the conversation item the reply becomes (delete_item)


@dataclass
class StageTimings:
    """Milliseconds from the call to `respond` (the end of the user's turn)."""

    prefill_ms: float | None = None  # remainder of the user's turn prefilled
    first_text_ms: float | None = None
    first_codec_ms: float | None = None
    first_audio_ms: float | None = None
    total_ms: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass
class AudioChunk:
    pcm: np.ndarray  # int16 mono, 24 kHz
    first_sample: int  # offset of pcm[0] within the reply's audio


@dataclass
class ReplyDone:
    status: Literal["completed", "cancelled", "failed"]
    text: str
    text_tokens: int
    audio_samples: int
    timings: StageTimings = field(default_factory=StageTimings)
    input_tokens: int = 0  # prompt tokens this turn added to the conversation
    error: str | None = None
    text_token_ids: list[int] = field(default_factory=list)
    codec_tokens: list[int] = field(default_factory=list)  # the talker's codes, for checks


EngineEvent = TextDelta | AudioChunk | ReplyDone


class EngineError(RuntimeError):
    """A request the engine refused or could not finish (the message says why)."""


class EngineCapacityError(EngineError):
    """A new session refused because the model's KV memory is fully reserved (try later)."""


class Engine(Protocol):
    """One conversation per session id; a session's calls are made one at a time."""

    async def open_session(self, session_id: str, options: SessionOptions) -> None: ...

    async def close_session(self, session_id: str) -> None: ...

    async def append_audio(
        self, session_id: str, pcm: np.ndarray, timestamp: float | None = None
    ) -> None:
        """User speech as it arrives (float32, 16 kHz); prefilled in 2-second chunks.

        `timestamp`: where its first sample is on the caller's audio clock, in seconds after
        the first audio sample the session received (the session counts every sample it got,
        also the silence server VAD keeps from the engine). The first audio of a turn's speech
        is where its video's time begins; None: unknown (its frames go in arrival order).
        """

    async def append_video_frame(
        self, session_id: str, rgb: np.ndarray, timestamp: float | None = None
    ) -> None:
        """A camera frame (uint8 HxWx3) taken while the user is talking; at most 2 per second.

        `timestamp`: its capture time on the same audio clock as `append_audio`'s. A stamped
        frame stands for the video instant captured nearest it (omni/engine/video_clock.py),
        however late or out of order it arrives, as long as it comes before the audio that
        completes its 2-second chunk; None: frames fill the video's instants in arrival order.
        Frames before the speech (negative times relative to it too) make the speech a video;
        the earliest stands for its start until a nearer one comes.
        """

    async def add_image(self, session_id: str, rgb: np.ndarray) -> None:
        """A still image for the current user turn."""

    async def add_text(self, session_id: str, text: str) -> None:
        """Typed text for the current user turn."""

    async def clear_user_turn(self, session_id: str) -> None:
        """Forget the user's input since the last reply (as if never sent)."""

    def respond(self, session_id: str, options: ReplyOptions) -> AsyncIterator[EngineEvent]:
        """Close the user's turn and stream the reply; ends with exactly one ReplyDone."""

    async def cancel(self, session_id: str) -> None:
        """Stop the current reply within one model step; what was produced stays."""

    async def truncate_reply(self, session_id: str, audio_ms: int) -> int:
        """Keep only the part of the last reply the caller heard; returns text tokens kept."""

    async def keep_reply_tokens(self, session_id: str, tokens: int) -> int:
        """Keep only the first `tokens` text tokens of the last reply (a cancelled text reply:
        what was sent); returns text tokens kept."""

    async def label_input(self, session_id: str, item_id: str, last_only: bool = False) -> None:
        """The turn's input not labelled yet (`last_only`: the last input sent) is conversation
        item `item_id`."""

    async def delete_item(self, session_id: str, item_id: str) -> None:
        """Forget a labelled input item or a past reply (ReplyOptions.item_id), wherever it
        is in the conversation: the model's context becomes the one without it."""

    async def discard_reply(self, session_id: str, item_id: str) -> None:
        """Forget the last reply (ReplyOptions.item_id `item_id`, ended; a speculative reply
        the caller never heard) as if it had never been asked for: its user turn is open
        again, followed by the input sent since, and the context is token for token the one
        that turn would have had without it."""

    async def set_truncation(self, session_id: str, truncation: Truncation) -> None:
        """How the session's context keeps to its budget from now on."""
