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

from omni.session.client_events import TranscriptionIn
from omni.session.errors import RealtimeError, quoted

DEFAULT_MODEL = "whisper-1"


@dataclass(frozen=True)
class InputTranscription:
    model: str = DEFAULT_MODEL
    language: str | None = None  # ISO-639-1; None: the transcriber detects it
    prompt: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {"model": self.model, "language": self.language, "prompt": self.prompt}
        return {k: v for k, v in wire.items() if v is not None}  # as sent: no nulls added


def input_transcription(given: TranscriptionIn | None, param: str) -> InputTranscription | None:
    """The settings a client sent (types checked by client_events; None: transcription off),
    or a RealtimeError naming the field."""
    if given is None:
        return None
    # Whisper's own language table; imported here, so a gateway that never sees a language
    # does not load transformers
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    language = given.language.lower() if given.language else None
    if language is not None and language not in LANGUAGES:
        raise RealtimeError(
            "invalid_value",
            f"unknown transcription language {quoted(given.language)}; give an ISO-639-1 code "
            "such as 'en'",
            param=f"{param}.language",
        )
    return InputTranscription(given.model or DEFAULT_MODEL, language, given.prompt or None)
