"""Client events: validate a raw JSON object into one typed event, or say exactly what's wrong.

The models accept both wire shapes: OpenAI Realtime GA (nested `audio.input/output`,
`output_modalities`), the beta shape (flat `modalities`, `voice`, `input_audio_format`,
`turn_detection`) and Qwen-Omni-Realtime's additions (`input_image_buffer.append`, `seed`,
`max_tokens`). Unknown extra fields are ignored, as OpenAI's server does, so newer clients
keep working. pydantic does the checking so every message names the field (`param`) at fault,
in strict mode: a number sent as a string is an error, not coerced, and numbers are finite.

Raw text is checked before it is parsed: nesting deeper than `max_json_depth` is refused by
a linear scan (json's recursive parser would otherwise hit Python's recursion limit), and
NaN/Infinity, which Python's json accepts, are not JSON.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from omni.session.errors import QUOTE_LIMIT, RealtimeError, quoted
from omni.session.turn_detection import Eagerness

Modality = Literal["text", "audio"]
MAX_EVENT_ID = 128  # longer client event ids are not echoed back
MAX_MODEL_NAME = 256  # a model name is echoed in every session object
MAX_NAME = 256  # other echoed names: tools, tracing, prompt ids, a transcription language
MAX_TRANSCRIPTION_PROMPT = 4096  # characters; echoed in every session object
# a JSON string, quotes and escapes included (the unrolled form: no backtracking)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# what pydantic puts in an error's loc for the member of a union it tried: not a field name
_UNION_MEMBER = re.compile(
    r"(literal|list|dict|function-\w+)\[.*\]|int|str|float|bool|[A-Z]\w*In"
)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TurnDetectionIn(_Model):
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10_000)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = Field(None, ge=0)
    eagerness: Eagerness | None = None  # semantic_vad only


class NoiseReductionIn(_Model):
    type: Literal["near_field", "far_field"]


class TranscriptionIn(_Model):
    model: str | None = Field(None, max_length=MAX_MODEL_NAME)
    language: str | None = Field(None, max_length=MAX_NAME)
    prompt: str | None = Field(None, max_length=MAX_TRANSCRIPTION_PROMPT)


class ToolIn(_Model):
    type: Literal["function", "mcp"] = "function"
    name: str | None = Field(None, max_length=MAX_NAME)


class ToolChoiceFunctionIn(_Model):
    type: Literal["function"]
    name: str = Field(max_length=MAX_NAME)


class ToolChoiceMcpIn(_Model):
    type: Literal["mcp"]
    server_label: str = Field(max_length=MAX_NAME)
    name: str | None = Field(None, max_length=MAX_NAME)


class TracingIn(_Model):
    workflow_name: str | None = Field(None, max_length=MAX_NAME)
    group_id: str | None = Field(None, max_length=MAX_NAME)
    metadata: dict[str, Any] | None = None


class PromptIn(_Model):
    id: str = Field(max_length=MAX_NAME)
    version: str | None = Field(None, max_length=MAX_NAME)
    variables: dict[str, Any] | None = None


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[ToolChoiceFunctionIn | ToolChoiceMcpIn, Field(discriminator="type")]
)
Tracing = Literal["auto"] | TracingIn
Include = Literal["item.input_audio_transcription.logprobs"]


class AudioFormatIn(_Model):
    type: str = "audio/pcm"
    rate: int | None = None


class AudioInputIn(_Model):
    format: AudioFormatIn | None = None
    # explicitly null turns VAD off, so "set to null" and "not given" differ (model_fields_set)
    turn_detection: TurnDetectionIn | None = None
    transcription: TranscriptionIn | None = None
    noise_reduction: NoiseReductionIn | None = None


class AudioOutputIn(_Model):
    format: AudioFormatIn | None = None
    voice: str | None = None
    speed: float | None = Field(None, ge=0.25, le=1.5)


class AudioIn(_Model):
    input: AudioInputIn | None = None
    output: AudioOutputIn | None = None


class RetentionRatioIn(_Model):
    type: Literal["retention_ratio"]
    retention_ratio: float = Field(ge=0.0, le=1.0)


class SessionIn(_Model):
    """Every session field either shape may send; `model_fields_set` tells what was sent."""

    type: Literal["realtime"] | None = None
    model: str | None = Field(None, max_length=MAX_MODEL_NAME)
    instructions: str | None = None
    output_modalities: list[Modality] | None = Field(None, min_length=1)
    audio: AudioIn | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    tracing: Tracing | None = None
    include: list[Include] | None = None
    prompt: PromptIn | None = None
    truncation: Literal["auto", "disabled"] | RetentionRatioIn | None = None
    # beta shape
    modalities: list[Modality] | None = Field(None, min_length=1)
    voice: str | None = None
    input_audio_format: str | None = None
    output_audio_format: str | None = None
    turn_detection: TurnDetectionIn | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None
    input_audio_transcription: TranscriptionIn | None = None
    input_audio_noise_reduction: NoiseReductionIn | None = None
    speed: float | None = Field(None, ge=0.25, le=1.5)
    # Qwen-Omni-Realtime
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)


BETA_SESSION_FIELDS = frozenset(
    {
        "modalities",
        "voice",
        "input_audio_format",
        "output_audio_format",
        "turn_detection",
        "max_response_output_tokens",
        "input_audio_transcription",
        "input_audio_noise_reduction",
    }
)
GA_SESSION_FIELDS = frozenset(
    {"type", "audio", "output_modalities", "max_output_tokens", "include", "prompt"}
)


class ContentIn(_Model):
    type: Literal[
        "input_text", "input_audio", "input_image", "text", "output_text", "audio", "output_audio"
    ]
    text: str | None = None
    audio: str | None = None
    image_url: str | None = None
    transcript: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class ItemIn(_Model):
    id: str | None = Field(None, min_length=1, max_length=64)
    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentIn] = Field(default_factory=list)


class ResponseAudioOutputIn(_Model):
    voice: str | None = None
    format: AudioFormatIn | None = None


class ResponseAudioIn(_Model):
    output: ResponseAudioOutputIn | None = None


class ResponseIn(_Model):
    instructions: str | None = None
    output_modalities: list[Modality] | None = Field(None, min_length=1)
    audio: ResponseAudioIn | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    metadata: dict[str, str] | None = None
    conversation: str | None = None
    input: list[Any] | None = None
    tools: list[ToolIn] | None = None  # accepted, never called (as the session's)
    tool_choice: ToolChoice | None = None
    # beta shape
    modalities: list[Modality] | None = Field(None, min_length=1)
    voice: str | None = None
    output_audio_format: str | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None


class _Event(_Model):
    event_id: str | None = Field(None, max_length=MAX_EVENT_ID)


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionIn


class InputAudioBufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class InputImageBufferAppend(_Event):
    type: Literal["input_image_buffer.append"]
    image: str


class ConversationItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: ItemIn
    previous_item_id: str | None = None


class ConversationItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ConversationItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ConversationItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseIn | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioBufferClear(_Event):
    type: Literal["output_audio_buffer.clear"]


ClientEvent = Annotated[
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | InputImageBufferAppend
    | ConversationItemCreate
    | ConversationItemRetrieve
    | ConversationItemTruncate
    | ConversationItemDelete
    | ResponseCreate
    | ResponseCancel
    | OutputAudioBufferClear,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
EVENT_TYPES = frozenset(
    get_args(model.model_fields["type"].annotation)[0]
    for model in get_args(get_args(ClientEvent)[0])
)


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text, without parsing it (linear time)."""
    bare = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), np.uint8)
    steps = np.isin(bare, _OPEN).astype(np.int32) - np.isin(bare, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON (numbers must be finite)")


def decode_client_event(message: str, max_depth: int) -> ClientEvent:
    """A client message's text to a typed event; a RealtimeError naming the problem otherwise.
    Costly for large messages, so the session runs those off the event loop."""
    if message.count("[") + message.count("{") > max_depth and nesting_depth(message) > max_depth:
        raise RealtimeError(
            "invalid_json", f"the message nests arrays/objects deeper than {max_depth} levels"
        )
    try:
        raw = json.loads(message, parse_constant=_not_json)
    except ValueError as exc:
        raise RealtimeError("invalid_json", f"the message is not valid JSON: {exc}") from None
    return parse_client_event(raw)


def parse_client_event(raw: object) -> ClientEvent:
    """A decoded JSON value to a typed event; a RealtimeError naming the problem otherwise."""
    if not isinstance(raw, dict):
        raise RealtimeError("invalid_event", "an event must be a JSON object")
    event_id = raw.get("event_id")
    if not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID:
        event_id = None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise RealtimeError(
            "missing_field", "the event has no string 'type'", param="type", event_id=event_id
        )
    if kind not in EVENT_TYPES:
        raise RealtimeError(
            "unknown_event", f"unknown event type {quoted(kind)}", param="type", event_id=event_id
        )
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        # the first loc element is the union tag; the rest is the field path
        raise validation_error(exc, kind, skip=1, event_id=event_id) from None


def field_path(loc: tuple[int | str, ...]) -> list[str]:
    """An error's loc without the union members pydantic tried (a tagged union's tag too)."""
    path: list[str] = []
    parts = iter(str(part) for part in loc)
    for part in parts:
        if part.startswith("tagged-union["):
            next(parts, None)
        elif not _UNION_MEMBER.fullmatch(part):
            path.append(part)
    return path


def validation_error(
    exc: ValidationError, what: str, skip: int = 0, event_id: str | None = None
) -> RealtimeError:
    """pydantic's first complaint as a RealtimeError naming the field (`param`)."""
    errors = [(error, field_path(error["loc"][skip:])) for error in exc.errors()]
    # of a union's complaints, the one that got deepest says most (the first among equals)
    first, path = max(errors, key=lambda pair: len(pair[1]))
    # a loc can hold a client's dict key: never echo more than a short prefix of it
    param = ".".join(path)[:QUOTE_LIMIT] or None
    if first["type"] == "missing":
        message = f"{what}: missing required field {param!r}"
        return RealtimeError("missing_field", message, param=param, event_id=event_id)
    message = f"{what}: {param}: {first['msg']}" if param else f"{what}: {first['msg']}"
    return RealtimeError("invalid_value", message, param=param, event_id=event_id)
