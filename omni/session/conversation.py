"""The conversation as the client sees it: ordered items with OpenAI ids and content.

The model's own memory lives in the engine (its KV cache); this is the client-facing
ledger that `conversation.item.retrieve/truncate/delete` act on. It keeps no audio bytes:
user audio lives in the pending turn until the engine has it, and assistant audio is the
client's to keep, so retrieved items carry transcripts only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from omni.session.errors import RealtimeError, new_id, quoted

Role = Literal["user", "assistant"]
Status = Literal["in_progress", "completed", "incomplete"]


@dataclass
class Item:
    role: Role
    content: list[dict[str, Any]]  # GA-shaped content parts
    id: str = field(default_factory=lambda: new_id("item"))
    status: Status = "completed"
    audio_samples: int = 0  # assistant audio sent to the client (24 kHz samples)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "role": self.role,
            "status": self.status,
            "content": [dict(part) for part in self.content],
        }


class Conversation:
    def __init__(self) -> None:
        self._items: dict[str, Item] = {}  # insertion order is conversation order

    @property
    def last_id(self) -> str | None:
        return next(reversed(self._items), None)

    def add(self, item: Item) -> str | None:
        """Append; returns the previous item's id (None for the first)."""
        if item.id in self._items:
            raise RealtimeError(
                "invalid_value", f"an item with id {item.id!r} already exists", param="item.id"
            )
        previous = self.last_id
        self._items[item.id] = item
        return previous

    def get(self, item_id: str, param: str = "item_id") -> Item:
        try:
            return self._items[item_id]
        except KeyError:
            raise RealtimeError(
                "item_not_found", f"no item with id {quoted(item_id)}", param=param
            ) from None

    def remove(self, item_id: str) -> None:
        self._items.pop(item_id, None)
