"""GA → beta renames for server events, so a beta-speaking client is answered in its shape.

The session builds every event in the GA shape; `to_beta` rewrites one for a client that
spoke beta (flat session fields, an `OpenAI-Beta: realtime=v1` header, or Qwen-Omni-Realtime,
which uses the beta names). Session objects are rendered per shape by `config.py`, so they
pass through untouched here.
"""

from __future__ import annotations

from typing import Any

_EVENT_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
_GA_ONLY = frozenset({"conversation.item.done"})
_CONTENT_TYPES = {"output_audio": "audio", "output_text": "text"}


def _item(item: dict[str, Any]) -> dict[str, Any]:
    content = [
        {**part, "type": _CONTENT_TYPES.get(part.get("type"), part.get("type"))}
        for part in item["content"]
    ]
    return {**item, "content": content}


def _response(response: dict[str, Any]) -> dict[str, Any]:
    beta = {k: v for k, v in response.items() if k not in ("output_modalities", "audio")}
    modalities = response.get("output_modalities") or ["audio"]
    beta["modalities"] = ["text", "audio"] if "audio" in modalities else ["text"]
    output = (response.get("audio") or {}).get("output") or {}
    beta["voice"] = output.get("voice")
    beta["output_audio_format"] = "pcm16"
    beta["output"] = [_item(item) for item in response.get("output", [])]
    return beta


def to_beta(event: dict[str, Any]) -> dict[str, Any] | None:
    """The beta form of a GA event, or None when beta has no such event."""
    kind = event["type"]
    if kind in _GA_ONLY:
        return None
    beta = {**event, "type": _EVENT_NAMES.get(kind, kind)}
    if "item" in beta:
        beta["item"] = _item(beta["item"])
    if "response" in beta:
        beta["response"] = _response(beta["response"])
    return beta
