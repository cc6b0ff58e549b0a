"""A user message's content parts: decoded for the engine, and echoed for the conversation.

Everything is decoded before anything changes, so a bad part refuses the whole item. The
echo leaves out the bulky payloads (image data, audio bytes), as the conversation keeps no
media.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omni.session.client_events import ItemIn
from omni.session.engine_queue import TurnInput
from omni.session.errors import RealtimeError
from omni.session.images import decode_image_url
from omni.session.wire_audio import AudioFormat, b64decode, decode_clip
from omni.settings import Settings

_PAYLOAD = {"input_text": "text", "input_image": "image_url", "input_audio": "audio"}


@dataclass(frozen=True)
class ItemCaps:
    """What one user item may hold; each refusal names its setting."""

    max_image_pixels: int  # image_max_pixels: larger images are scaled down, not refused
    max_text_chars: int  # max_input_text_chars
    max_audio_seconds: float  # max_buffered_audio_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> ItemCaps:
        return cls(
            settings.image_max_pixels,
            settings.max_input_text_chars,
            settings.max_buffered_audio_seconds,
        )


def user_content(
    item: ItemIn, fmt: AudioFormat, caps: ItemCaps
) -> tuple[list[dict[str, Any]], list[TurnInput]]:
    """(content parts for the item, inputs for the engine) of a user message; CPU-heavy for
    images and audio clips, so the session runs it off the event loop."""
    if item.type != "message" or item.role != "user":
        raise RealtimeError(
            "unsupported",
            "only user messages can be added (no function calls, system or assistant items)",
            param="item.role" if item.type == "message" else "item.type",
        )
    if not item.content:
        raise RealtimeError(
            "invalid_value", "a user message needs at least one content part", param="item.content"
        )
    parts: list[dict[str, Any]] = []
    inputs: list[TurnInput] = []
    for index, part in enumerate(item.content):
        param = f"item.content.{index}"
        field = _PAYLOAD.get(part.type)
        if field is None:
            raise RealtimeError(
                "invalid_value", f"{part.type!r} is not a user content type", param=f"{param}.type"
            )
        payload = getattr(part, field)
        if payload is None:
            raise RealtimeError(
                "missing_field", f"{part.type} needs '{field}'", param=f"{param}.{field}"
            )
        where = f"{param}.{field}"
        if part.type == "input_text":
            if len(payload) > caps.max_text_chars:
                raise RealtimeError(
                    "input_text_too_long",
                    f"{where} is {len(payload)} characters, over the limit of "
                    f"{caps.max_text_chars} (max_input_text_chars)",
                    param=where,
                )
            inputs.append(TurnInput("text", payload))
            parts.append({"type": "input_text", "text": payload})
        elif part.type == "input_image":
            image = decode_image_url(payload, where, caps.max_image_pixels)
            inputs.append(TurnInput("image", image))
            parts.append({"type": "input_image", "detail": part.detail or "auto"})
        else:
            data = b64decode(payload, where)
            seconds = fmt.seconds(len(data))
            if seconds > caps.max_audio_seconds:
                raise RealtimeError(
                    "input_audio_too_long",
                    f"{where} holds {seconds:.1f} s of audio, over the "
                    f"{caps.max_audio_seconds:g} s limit (max_buffered_audio_seconds)",
                    param=where,
                )
            inputs.append(TurnInput("audio", decode_clip(data, fmt, where)))
            parts.append({"type": "input_audio", "transcript": part.transcript})
    return parts, inputs
