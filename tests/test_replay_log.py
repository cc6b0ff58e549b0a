"""The replay log alone: what a restart would send, cuts, clears and its bound. No model: fast."""

from __future__ import annotations

import logging

import pytest

from omni.engine import protocol as p
from omni.engine.replay import TOKEN_BYTES, ReplayLog


def text(words: str) -> bytes:
    return p.encode(p.AddText("s", words))


def replayed(log: ReplayLog) -> list[p.Msg]:
    return [p.decode(data) for data in log.messages()]


def test_inputs_and_replies_replay_in_order_with_kept_tokens() -> None:
    log = ReplayLog("s", None, 10_000)
    log.add_input(text("one"))
    log.reply_started("r1", None)
    log.reply_tokens("r1", [5, 6])
    log.reply_tokens("r1", [7])
    log.reply_finished("r1", [5, 6, 7, 8])  # the thinker's word is final
    log.add_input(text("two"))
    assert replayed(log) == [
        p.AddText("s", "one"),
        p.AddReply("s", [5, 6, 7, 8], None),
        p.AddText("s", "two"),
    ]


def test_a_reply_whose_worker_died_keeps_what_it_streamed() -> None:
    log = ReplayLog("s", None, 10_000)
    log.add_input(text("one"))
    log.reply_started("r1", None)
    log.reply_tokens("r1", [5, 6])
    assert replayed(log)[-1] == p.AddReply("s", [5, 6], None)


def test_truncation_cuts_only_a_finished_reply() -> None:
    log = ReplayLog("s", None, 10_000)
    log.reply_started("r1", None)
    log.reply_tokens("r1", [5, 6, 7])
    log.truncated(1)  # the thinker refuses to cut a reply in progress: so does the log
    log.reply_finished("r1", [5, 6, 7])
    log.add_input(text("next"))  # the next turn had begun when the truncation came
    log.truncated(2)
    assert replayed(log) == [p.AddReply("s", [5, 6], None), p.AddText("s", "next")]
    assert log.size == len(text("next")) + 2 * TOKEN_BYTES


def test_clear_forgets_only_the_open_turn() -> None:
    log = ReplayLog("s", None, 10_000)
    log.add_input(text("kept"))
    log.reply_started("r1", None)
    log.reply_finished("r1", [5])
    log.add_input(text("forgotten"))
    log.clear_turn()
    assert replayed(log) == [p.AddText("s", "kept"), p.AddReply("s", [5], None)]


def test_changed_instructions_stay_with_every_later_reply() -> None:
    """Once a reply changed them, later replies carry them: the change survives the drop of
    the turn that made it."""
    log = ReplayLog("s", "be brief", 10_000)
    log.reply_started("r1", None)
    log.reply_started("r2", "be kind")
    log.reply_started("r3", None)
    assert [m.instructions for m in replayed(log)] == [None, "be kind", "be kind"]


def test_over_the_bound_the_oldest_whole_turns_go(caplog: pytest.LogCaptureFixture) -> None:
    turn = len(text("aaaa")) + 2 * TOKEN_BYTES
    log = ReplayLog("s", None, 2 * turn)
    with caplog.at_level(logging.WARNING, "omni.engine.replay"):
        for i, words in enumerate(["aaaa", "bbbb", "cccc"]):
            log.add_input(text(words))
            log.reply_started(f"r{i}", None)
            log.reply_finished(f"r{i}", [i, i])
    assert replayed(log) == [
        p.AddText("s", "bbbb"),
        p.AddReply("s", [1, 1], None),
        p.AddText("s", "cccc"),
        p.AddReply("s", [2, 2], None),
    ]
    assert log.size == 2 * turn and log.dropped_turns == 1
    assert "dropped its 1 oldest turn(s) (1 so far) and the first 0 input(s)" in caplog.text
    log.truncated(0)  # the last reply is still there to cut
    assert replayed(log)[-1] == p.AddReply("s", [], None)


def test_a_turn_bigger_than_the_bound_keeps_only_its_latest_inputs() -> None:
    chunk = len(text("aaaa"))
    log = ReplayLog("s", None, chunk)
    log.add_input(text("aaaa"))
    log.add_input(text("bbbb"))
    assert replayed(log) == [p.AddText("s", "bbbb")]
    assert log.size == chunk and log.dropped_turns == 0
