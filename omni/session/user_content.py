"""A user message's content parts: decoded for the engine, and echoed for the conversation.

Everything is decoded before anything changes, so a bad part refuses the whole item. The
echo leaves out the bulky payloads (image data, audio bytes), as the conversation keeps no
media.
"""

from __future__ import annotations

from typing import Any

from omni.session.client_events import ItemIn
from omni.session.engine_queue import TurnInput
from omni.session.errors import RealtimeError
from omni.session.images import decode_image_url
from omni.session.wire_audio import AudioFormat, b64decode, decode_clip

_PAYLOAD = {"input_text": "text", "input_image": "image_url", "input_audio": "audio"}


def user_content(
    item: ItemIn, fmt: AudioFormat, max_image_pixels: int
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
            inputs.append(TurnInput("text", payload))
            parts.append({"type": "input_text", "text": payload})
        elif part.type == "input_image":
            inputs.append(TurnInput("image", decode_image_url(payload, where, max_image_pixels)))
            parts.append({"type": "input_image", "detail": part.detail or "auto"})
        else:
            inputs.append(TurnInput("audio", decode_clip(b64decode(payload, where), fmt, where)))
            parts.append({"type": "input_audio", "transcript": part.transcript})
    return parts, inputs
