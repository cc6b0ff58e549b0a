"""The one exception a session raises for a client mistake, and its `error` event.

Every problem a client can cause (bad JSON, a missing field, audio that doesn't decode, an
event that makes no sense now) becomes a `RealtimeError`. The session turns it into an
OpenAI-shaped `error` event that names the problem and echoes the client's event_id, and
carries on: an error never changes session state.
"""

from __future__ import annotations

import secrets
from typing import Any

from omni.engine.api import CONTEXT_LENGTH_EXCEEDED


QUOTE_LIMIT = 64  # characters of client input an error message may repeat


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as repr for an error message, cut to `limit` characters: errors name what was
    wrong without echoing a large input back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def new_id(prefix: str) -> str:
    """OpenAI-style ids ("item_...", "resp_..."): a prefix and 20 random hex digits."""
    return f"{prefix}_{secrets.token_hex(10)}"


def engine_error_code(message: str | None) -> str:
    """The error code of an engine failure: the context budget's has its own (the engine's
    message starts with it), anything else is engine_error."""
    return CONTEXT_LENGTH_EXCEEDED if CONTEXT_LENGTH_EXCEEDED in (message or "") else "engine_error"


class RealtimeError(Exception):
    """A client-visible error: `code` is machine-readable, `message` says what to fix."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        event_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type
        self.event_id = event_id

    def to_event(self) -> dict[str, Any]:
        return {
            "type": "error",
            "event_id": new_id("event"),
            "error": {
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "event_id": self.event_id,
            },
        }
