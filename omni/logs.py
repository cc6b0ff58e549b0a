"""Logging for the service: text for people, JSON lines for log pipelines, with call ids.

The session and engine code log with plain `log.info(...)`. Which call and which reply a
line belongs to comes from two context variables that the gateway sets where a session runs
(`bind_session`) and the session sets around a reply (`bind_response`); asyncio copies them
into every task started from there, so a filter can stamp them on each record without any
logging call passing them. The JSON formatter is a few lines over the stdlib's: no extra
dependency, and its fields are ours to document.

Secrets never reach the output: at debug level the WebSocket library logs every handshake
header (Authorization, and the subprotocol a browser's key rides in), and other libraries
may print what they were given, so the handler redacts bearer tokens, subprotocol keys,
`ek_` client secrets and the configured secrets' exact values from every line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

SESSION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)
RESPONSE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "response_id", default=None
)

# LogRecord attributes that are not extra fields passed by a caller (uvicorn adds
# color_message: the same text with ANSI colours)
_NOT_EXTRA = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
    "session_id",
    "response_id",
}


def bind_session(session_id: str) -> None:
    """Mark what runs from here on (this task and the tasks it starts) as this session's."""
    SESSION_ID.set(session_id)


@contextmanager
def bind_response(response_id: str) -> Iterator[None]:
    """Mark the lines logged inside the block as this reply's."""
    token = RESPONSE_ID.set(response_id)
    try:
        yield
    finally:
        RESPONSE_ID.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current session and response ids onto each record (None outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = SESSION_ID.get()
        record.response_id = RESPONSE_ID.get()
        return True


REDACTED = "[redacted]"
_SECRET_SHAPES = re.compile(
    r"(?i)(?P<lead>\bbearer\s+|openai-insecure-api-key\.)[^\s,;\"']+"
    r"|\bek_[A-Za-z0-9_-]{8,}"
)


class RedactSecrets(logging.Filter):
    """Rewrites a record whose text holds a secret: API keys and other configured secrets
    by value, and anything shaped like a key (`Bearer …`, `openai-insecure-api-key.…`,
    `ek_…`)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # longest first, so a secret that contains another is removed whole
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _SECRET_SHAPES.sub(lambda m: (m.group("lead") or "") + REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class TextFormatter(logging.Formatter):
    """The usual one-line format, with `[session response]` when the line belongs to a call."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            i
            for i in (getattr(record, "session_id", None), getattr(record, "response_id", None))
            if i
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, session_id, response_id,
    exception text if any, and any `extra=` fields the caller passed."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("session_id", "response_id"):
            if (value := getattr(record, key, None)) is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _NOT_EXTRA and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(
    level: str, fmt: LogFormat, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Replace the root handlers with one handler in `fmt` on `stream` (default stderr),
    uvicorn's loggers included, so access and error lines come out in the same format;
    `secrets` are redacted wherever they appear."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
