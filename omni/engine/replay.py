"""What one session sent the thinker, kept so restarted workers can rebuild its conversation.

The engine front end records every input message as the bytes it sent (audio stays float32,
as received, so a rebuilt conversation is token for token the original) and every reply as
the token ids it kept: the reply's output as the thinker reported it, cut when the caller's
truncation is confirmed. On a restart the log is sent again in order, each past reply as an
`AddReply` (teacher-forced, with the instructions in force then), so the model sees the same
conversation without generating anything.

The log keeps what the thinker's context budget evicted (context_budget.py): a rebuild sends
it all and the same budget evicts again as the rebuilt conversation runs, oldest kind first.

Inputs are labelled with the conversation item they make up (`label`), and replies with
theirs, so an item can be deleted wherever it is (`delete_item`): it goes from the log, and
the thinker rewinds to its turn and is sent the log again from there (`messages(turn)`).
Turns are numbered from the first the session had, as the thinker numbers its exchanges.

A clear drops the open turn's inputs from the log (replaying them and the clear would leave
nothing). The log is bounded: over `max_bytes`, the oldest whole turns are dropped (a turn
over the bound by itself loses its first inputs), each drop is logged, and a later rebuild
says how many turns it lacks. Video fills it first (a 448x448 frame is 600 kB; a second of
speech 64 kB).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from omni.engine import protocol as p

log = logging.getLogger(__name__)

TOKEN_BYTES = 8  # what one kept reply token is counted as


@dataclass
class _Turn:
    """User inputs (encoded messages, in order), then the reply to them once asked for."""

    inputs: list[bytes] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)  # each input's item (None: not yet)
    size: int = 0
    replied: bool = False
    reply_id: str | None = None
    reply_item: str | None = None
    instructions: str | None = None  # in force for the reply; None: the session's own
    tokens: list[int] = field(default_factory=list)
    finished: bool = False  # the thinker reported the reply's end


class ReplayLog:
    def __init__(self, session_id: str, instructions: str | None, max_bytes: int) -> None:
        self.session_id = session_id
        self.max_bytes = max_bytes
        self.dropped_turns = 0
        self._instructions = instructions  # in force now (a reply can change them)
        self._changed = False  # whether a reply changed them from the session's own
        self._turns: deque[_Turn] = deque([_Turn()])
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def first_turn(self) -> int:
        """The number of the oldest turn kept (the turns before it were dropped)."""
        return self.dropped_turns

    def add_input(self, data: bytes) -> None:
        """An encoded AppendAudio / AppendFrame / AddImage / AddText, as sent."""
        turn = self._open_turn()
        turn.inputs.append(data)
        turn.labels.append(None)
        self._grow(turn, len(data))

    def label(self, item_id: str, last_only: bool = False) -> None:
        """The last turn's inputs not labelled yet (`last_only`: its last input) make up item
        `item_id`."""
        turn = self._turns[-1]
        if last_only:
            if turn.labels:
                turn.labels[-1] = item_id
            return
        turn.labels = [item_id if label is None else label for label in turn.labels]

    def clear_turn(self) -> None:
        turn = self._open_turn()
        self._size -= turn.size
        turn.inputs, turn.labels, turn.size = [], [], 0

    def reply_started(
        self, reply_id: str, instructions: str | None, item_id: str | None = None
    ) -> None:
        """A Respond: the open turn closes with this reply (conversation item `item_id`)."""
        if instructions is not None:
            self._instructions, self._changed = instructions, True
        turn = self._open_turn()
        turn.replied, turn.reply_id, turn.reply_item = True, reply_id, item_id
        turn.instructions = self._instructions if self._changed else None

    def reply_tokens(self, reply_id: str, token_ids: list[int]) -> None:
        """Tokens the reply streamed (all a reply keeps if its worker dies before it ends)."""
        turn = self._reply_turn(reply_id)
        if turn is not None and not turn.finished:
            turn.tokens.extend(token_ids)
            self._grow(turn, TOKEN_BYTES * len(token_ids))

    def reply_finished(self, reply_id: str, kept: list[int]) -> None:
        """The thinker ended the reply; `kept` are its tokens without the end token."""
        turn = self._reply_turn(reply_id)
        if turn is not None:
            self._grow(turn, TOKEN_BYTES * (len(kept) - len(turn.tokens)))
            turn.tokens, turn.finished = list(kept), True

    def truncated(self, kept: int) -> None:
        """The thinker confirmed it kept `kept` tokens of its last reply. A reply still in
        progress when the truncation was asked is left alone there, so it is here too."""
        turn = self._last_reply()
        if turn is not None and turn.finished and kept < len(turn.tokens):
            self._grow(turn, -TOKEN_BYTES * (len(turn.tokens) - kept))
            del turn.tokens[kept:]

    @property
    def last_reply_item(self) -> str | None:
        """The conversation item of the latest reply (None: no reply, or one without)."""
        turn = self._last_reply()
        return None if turn is None else turn.reply_item

    def delete_item(self, item_id: str) -> int:
        """Drop an item's inputs, or a reply (its turn then runs into the next one, as two user
        items in a row do); returns the number of the turn it was in. KeyError: not here."""
        for index, turn in enumerate(self._turns):
            if item_id in turn.labels:
                pairs = list(zip(turn.inputs, turn.labels))
                self._grow(turn, -sum(len(d) for d, label in pairs if label == item_id))
                turn.inputs = [d for d, label in pairs if label != item_id]
                turn.labels = [label for label in turn.labels if label != item_id]
                return self.first_turn + index
            if turn.replied and turn.reply_item == item_id:
                self._grow(turn, -TOKEN_BYTES * len(turn.tokens))
                if index + 1 < len(self._turns):
                    after = self._turns[index + 1]
                    del self._turns[index + 1]
                    after.inputs[:0], after.labels[:0] = turn.inputs, turn.labels
                    after.size += turn.size
                    self._turns[index] = after
                else:
                    turn.replied, turn.reply_id, turn.reply_item = False, None, None
                    turn.tokens, turn.finished = [], False
                return self.first_turn + index
        raise KeyError(item_id)

    def drop_turn(self, number: int) -> None:
        """The thinker forgot turn `number` (its input could not fit): it goes from the log
        too, leaving an empty turn that the next input fills, as the thinker's next exchange
        takes the same number."""
        index = number - self.first_turn
        if not 0 <= index < len(self._turns):
            return
        while len(self._turns) > index:
            self._size -= self._turns.pop().size
        self._turns.append(_Turn())

    def messages(self, from_turn: int | None = None) -> Iterator[bytes]:
        """The conversation again (from turn `from_turn` on), as encoded messages for the
        thinker, oldest first."""
        start = 0 if from_turn is None else max(0, from_turn - self.first_turn)
        for turn in list(self._turns)[start:]:
            yield from turn.inputs
            if turn.replied:
                yield p.encode(p.AddReply(self.session_id, list(turn.tokens), turn.instructions))

    # -- internals

    def _open_turn(self) -> _Turn:
        if self._turns[-1].replied:
            self._turns.append(_Turn())
        return self._turns[-1]

    def _reply_turn(self, reply_id: str) -> _Turn | None:
        turn = self._last_reply()
        return turn if turn is not None and turn.reply_id == reply_id else None

    def _last_reply(self) -> _Turn | None:
        for turn in reversed(self._turns):
            if turn.replied:
                return turn
        return None

    def _grow(self, turn: _Turn, size: int) -> None:
        turn.size += size
        self._size += size
        if self._size <= self.max_bytes:
            return
        dropped = 0
        while self._size > self.max_bytes and len(self._turns) > 1:
            self._size -= self._turns.popleft().size
            dropped += 1
        self.dropped_turns += dropped
        latest, cut = self._turns[0], 0
        while self._size > self.max_bytes and latest.inputs:  # one turn over the bound alone
            data = latest.inputs.pop(0)
            latest.labels.pop(0)
            latest.size -= len(data)
            self._size -= len(data)
            cut += 1
        log.warning(
            "session %s: the replay log went over %g MB: dropped its %d oldest turn(s) (%d so "
            "far) and the first %d input(s) of the latest; a worker restart rebuilds the "
            "conversation without them",
            self.session_id,
            self.max_bytes / 1e6,
            dropped,
            self.dropped_turns,
            cut,
        )
