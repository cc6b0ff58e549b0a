"""Every message between the engine front end and its worker processes, in one place.

Messages are msgspec structs sent as msgpack (one tagged union), tensors as raw bytes with
dtype and shape: nothing is ever unpickled from a socket, so the same protocol can run over
ZeroMQ tcp:// between hosts. This module imports nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import msgspec
import numpy as np
import torch


class Array(msgspec.Struct, array_like=True):
    dtype: str  # a torch dtype name: "float32", "bfloat16", "int16", ...
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, value: torch.Tensor | np.ndarray) -> Array:
        t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        t = t.detach().to("cpu").contiguous()
        raw = t.view(torch.uint8) if t.numel() else t
        return cls(str(t.dtype).removeprefix("torch."), tuple(t.shape), raw.numpy().tobytes())

    def tensor(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {self.dtype!r}")
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)

    def numpy(self) -> np.ndarray:
        return self.tensor().numpy()


class Msg(msgspec.Struct, tag=True, omit_defaults=True):
    pass


# -- front end -> thinker -------------------------------------------------------------------


class OpenSession(Msg):
    session: str
    instructions: str | None = None
    truncation: str = "auto"  # session.truncation's type (context_budget.Truncation)
    retention_ratio: float = 1.0
    first_exchange: int = 0  # the replay log's number of the first turn it sends


class CloseSession(Msg):
    session: str


class AppendAudio(Msg):
    session: str
    pcm: Array  # float32, 16 kHz
    timestamp: float | None = None  # its first sample on the caller's audio clock (api.py)


class AppendFrame(Msg):
    session: str
    rgb: Array  # uint8 HxWx3
    timestamp: float | None = None  # its capture on the caller's audio clock (api.py)


class AddImage(Msg):
    session: str
    rgb: Array


class AddText(Msg):
    session: str
    text: str


class ClearTurn(Msg):
    session: str


class Respond(Msg):
    session: str
    reply: str
    output_audio: bool
    voice: str
    greedy: bool
    max_text_tokens: int
    min_text_tokens: int
    max_codec_tokens: int
    min_codec_tokens: int
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    instructions: str | None = None
    seed: int | None = None


class Cancel(Msg):  # also front end -> talker
    session: str
    reply: str


class Truncate(Msg):
    session: str
    request: str
    keep_tokens: int


class AddReply(Msg):
    """A past reply, teacher-forced: the engine rebuilds a conversation on restarted workers."""

    session: str
    token_ids: list[int]  # what the reply kept (after truncation), no end token
    instructions: str | None = None  # as Respond's: None keeps the session's


class InjectFault(Msg):  # tests only; ignored unless the worker was started with faults allowed
    kind: str  # "crash" | "hang"
    after_steps: int = 0


class SetTruncation(Msg):
    """A session.update's `truncation`: how the session's context keeps to its budget."""

    session: str
    truncation: str
    retention_ratio: float = 1.0


class Digest(Msg):
    """Ask for a digest of a session's context token ids (checks that two conversations are
    the same, token for token); answered with a Result."""

    session: str
    request: str


class Rewind(Msg):
    """Forget exchange `exchange` (a replay-log turn number) and all after it; the engine then
    sends the rest of the log again (an older item was deleted)."""

    session: str
    exchange: int


# -- thinker -> talker ----------------------------------------------------------------------


@dataclass
class ContextRows:
    """Talker inputs for conversation positions [start, start + n): (n, E) rows, their (3, n)
    TMRoPE positions and (n,) token ids. What a row holds is the family's (thinker.py's
    `talker_rows`): Qwen2.5-Omni's is the token's input embedding (zeroed for multimodal
    placeholders) plus its last hidden state; Qwen3-Omni's is the input embedding of a text
    token, the `accept_hidden_layer` state of a multimodal one (its talker projects each its
    own way, and keeps only the user turns: the token ids say which rows those are). Empty
    rows roll the context back to `start`. In-process form of `Rows`."""

    start: int
    rows: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor | None = None

    def message(self, session: str) -> Rows:
        ids = None if self.token_ids is None else Array.of(self.token_ids)
        return Rows(session, self.start, Array.of(self.rows), Array.of(self.positions), ids)


class Rows(Msg):
    """ContextRows on the wire."""

    session: str
    start: int
    rows: Array
    positions: Array
    token_ids: Array | None = None

    def context_rows(self) -> ContextRows:
        ids = None if self.token_ids is None else self.token_ids.tensor()
        return ContextRows(self.start, self.rows.tensor(), self.positions.tensor(), ids)


class EvictRows(Msg):
    """The thinker evicted these [start, end) context rows (its budget): the talker drops the
    same rows, from its cache too, so its context still mirrors the thinker's."""

    session: str
    ranges: list[tuple[int, int]]


class TalkerStart(Msg):
    session: str
    reply: str
    first_row: int
    voice: str
    greedy: bool
    max_codes: int
    min_codes: int
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    seed: int | None = None


# -- talker -> vocoder ----------------------------------------------------------------------


class VocoderStart(Msg):
    session: str
    reply: str
    voice: str
    seed: int | None = None  # of the Token2Wav noise; None: fresh


class Codes(Msg):
    """Codec tokens of a reply, in order, as the talker's steps produce them (Qwen3-Omni: each
    frame's codebooks 0..15, frame after frame)."""

    session: str
    reply: str
    codes: list[int]


class CodesEnd(Msg):
    """No more codes: `completed` (decode the rest) or `cancelled`/`failed` (drop it)."""

    session: str
    reply: str
    status: str


class TextEnd(Msg):
    session: str
    reply: str
    text_rows: int


# -- front end -> transcriber (omni/engine/transcriber_worker.py) --------------------------


class Transcribe(Msg):
    """Transcribe one user audio item; the worker answers TranscriptDelta..., TranscriptDone."""

    request: str
    pcm: Array  # float32, 16 kHz
    language: str | None = None  # ISO-639-1; None: Whisper detects it
    prompt: str | None = None  # text the transcript continues (names, spellings, style)


# -- transcriber -> front end ---------------------------------------------------------------


class TranscriptDelta(Msg):
    request: str
    text: str


class TranscriptDone(Msg):
    request: str
    status: str  # completed | failed
    text: str
    error: str | None = None


# -- workers -> front end -------------------------------------------------------------------


class Ready(Msg):
    worker: str
    info: dict[str, str] = {}


class Heartbeat(Msg):
    worker: str
    # the worker's KV memory (KVSlots.stats()), for /metrics; the thinker's adds
    # frame_offset_ms_max (ThinkerWorker.stats)
    kv: dict[str, int] = {}
    contexts: dict[str, int] = {}  # the thinker's context tokens per session, for /metrics


class TextOut(Msg):
    session: str
    reply: str
    text: str
    token_ids: list[int]


class ThinkerDone(Msg):
    session: str
    reply: str
    status: str  # completed | cancelled | failed
    text: str
    text_tokens: int
    input_tokens: int
    prefill_ms: float
    talker_started: bool = False  # False: no TalkerDone will follow
    token_ids: list[int] = []  # every token chosen, the ending one included


class CodeOut(Msg):
    """The first codec token of a reply (for timings); later codes are not reported."""

    session: str
    reply: str


class AudioOut(Msg):
    session: str
    reply: str
    pcm: Array  # int16, 24 kHz
    first_sample: int


class TalkerDone(Msg):
    session: str
    reply: str
    status: str
    codes: list[int]  # as Codes sends them
    vocoder_started: bool = False  # False: no VocoderDone will follow


class VocoderDone(Msg):
    session: str
    reply: str
    status: str
    audio_samples: int


class TurnDropped(Msg):
    """The thinker forgot turn `turn` (a replay-log turn number): its input could not fit the
    context, so the conversation is back where it was before the turn began."""

    session: str
    turn: int


class Result(Msg):
    request: str
    value: int


class WorkerError(Msg):
    worker: str
    message: str
    session: str | None = None
    reply: str | None = None


Message = Union[
    OpenSession,
    CloseSession,
    AppendAudio,
    AppendFrame,
    AddImage,
    AddText,
    ClearTurn,
    Respond,
    Cancel,
    Truncate,
    AddReply,
    InjectFault,
    Rows,
    TalkerStart,
    TextEnd,
    Ready,
    Heartbeat,
    TextOut,
    ThinkerDone,
    CodeOut,
    AudioOut,
    TalkerDone,
    VocoderStart,
    Codes,
    CodesEnd,
    VocoderDone,
    TurnDropped,
    Result,
    WorkerError,
    SetTruncation,
    Rewind,
    Digest,
    EvictRows,
    Transcribe,
    TranscriptDelta,
    TranscriptDone,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    return _decoder.decode(data)
