"""A session's input transcription settings: GA `audio.input.transcription`, beta
`input_audio_transcription`. Checked at `session.update`, so a language Whisper does not know
is refused there (naming the field), not item by item.

The server has one transcriber (the `transcriber_model` setting); the `model` a client names
is kept and echoed, not used to pick another. Fields of newer transcription models (`delay`,
`keywords`, `languages`) are ignored, as unknown fields are everywhere in the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from omni.session.client_events import MAX_MODEL_NAME, validation_error
from omni.session.errors import RealtimeError, quoted

DEFAULT_MODEL = "whisper-1"
MAX_PROMPT_CHARS = 4096  # Whisper keeps at most 223 tokens of it anyway


class _TranscriptionIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(None, max_length=MAX_MODEL_NAME)
    language: str | None = Field(None, max_length=16)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)


@dataclass(frozen=True)
class InputTranscription:
    model: str = DEFAULT_MODEL
    language: str | None = None  # ISO-639-1; None: the transcriber detects it
    prompt: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "language": self.language, "prompt": self.prompt}


def input_transcription(value: dict[str, Any] | None, param: str) -> InputTranscription | None:
    """The settings a client sent (None: transcription off), or a RealtimeError naming the field."""
    if value is None:
        return None
    try:
        given = _TranscriptionIn.model_validate(value)
    except ValidationError as exc:
        error = validation_error(exc, "session.update")
        error.param = f"{param}.{error.param}" if error.param else param
        raise error from None
    language = given.language.lower() if given.language else None
    if language is not None and language not in LANGUAGES:
        raise RealtimeError(
            "invalid_value",
            f"unknown transcription language {quoted(given.language)}; give an ISO-639-1 code "
            "such as 'en'",
            param=f"{param}.language",
        )
    return InputTranscription(given.model or DEFAULT_MODEL, language, given.prompt or None)
