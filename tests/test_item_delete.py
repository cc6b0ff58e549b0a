"""conversation.item.delete for any item, through the real worker processes on the tiny
checkpoint: after deleting an older user item or an older reply, the next greedy reply is
the one a fresh conversation built without that item gives (the thinker rewinds to the
item's turn and is sent the rest of the replay log again: recomputed, not evicted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway_fixtures import tiny_engine
from realtime_helpers import recv_until, running_server, send_event

from omni.checkpoints.processor import load_processor
from omni.engine.api import ReplyDone, ReplyOptions, SessionOptions
from omni.engine.engine import EngineConfig, running_engine

TEXT_ONLY = ReplyOptions(greedy=True, output_audio=False, max_text_tokens=5, min_text_tokens=5)
SPOKEN = ReplyOptions(greedy=True, max_text_tokens=5, min_text_tokens=5, max_codec_tokens=12)


async def reply(engine, options: ReplyOptions, item: str) -> ReplyDone:
    options = ReplyOptions(**{**options.__dict__, "item_id": item})
    async for event in engine.respond("s", options):
        if isinstance(event, ReplyDone):
            assert event.status == "completed", event.error
            return event
    raise AssertionError("respond() ended without ReplyDone")


async def say(engine, item: str, text: str) -> None:
    await engine.add_text("s", text)
    await engine.label_input("s", item)


def test_deleting_older_items_equals_a_fresh_conversation(tiny_checkpoint: Path) -> None:
    async def run() -> None:
        async with running_engine(EngineConfig(str(tiny_checkpoint))) as engine:
            await engine.open_session("s", SessionOptions())
            await say(engine, "u1", "The first thing I say.")
            a1 = await reply(engine, TEXT_ONLY, "a1")
            await say(engine, "u2", "A second thing, said later.")
            a2 = await reply(engine, TEXT_ONLY, "a2")
            await engine.delete_item("s", "u1")  # an older user item
            await say(engine, "u3", "And what now?")
            a3 = await reply(engine, SPOKEN, "a3")
            await engine.delete_item("s", "a2")  # an older reply
            await say(engine, "u4", "One more.")
            a4 = await reply(engine, TEXT_ONLY, "a4")
            await engine.close_session("s")

            # fresh: the conversation that never had u1 (a1 stays, answering nothing now), its
            # replies teacher-forced as they were kept
            await engine.open_session("f", SessionOptions())
            await forced(engine, "f", a1.text_token_ids[: a1.text_tokens])
            await engine.add_text("f", "A second thing, said later.")
            await forced(engine, "f", a2.text_token_ids[: a2.text_tokens])
            await engine.add_text("f", "And what now?")
            fresh_a3 = await reply_in(engine, "f", SPOKEN)
            assert a3.text_token_ids == fresh_a3.text_token_ids
            assert a3.codec_tokens == fresh_a3.codec_tokens  # the talker's context too
            await engine.close_session("f")

            # fresh: without u1 and without a2 (u2 and u3 are then one user turn)
            await engine.open_session("g", SessionOptions())
            await forced(engine, "g", a1.text_token_ids[: a1.text_tokens])
            await engine.add_text("g", "A second thing, said later.")
            await engine.add_text("g", "And what now?")
            await forced(engine, "g", a3.text_token_ids[: a3.text_tokens])
            await engine.add_text("g", "One more.")
            fresh_a4 = await reply_in(engine, "g", TEXT_ONLY)
            assert a4.text_token_ids == fresh_a4.text_token_ids
            assert a2.text_token_ids != fresh_a3.text_token_ids  # replies are not all alike

    asyncio.run(run())


async def reply_in(engine, session: str, options: ReplyOptions) -> ReplyDone:
    async for event in engine.respond(session, options):
        if isinstance(event, ReplyDone):
            assert event.status == "completed", event.error
            return event
    raise AssertionError("respond() ended without ReplyDone")


async def forced(engine, session: str, tokens: list[int]) -> None:
    """A past reply, teacher-forced, as a worker restart rebuilds one (protocol AddReply)."""
    from omni.engine import protocol as p

    engine._send("thinker", p.AddReply(session, tokens))
    engine._sessions[session].replay.reply_started("forced", None)
    engine._sessions[session].replay.reply_finished("forced", tokens)


async def ws_reply(ws, text: str | None, item: str | None = None) -> dict:
    """Add a user text item (unless None), ask for a text reply, return its response.done."""
    if text is not None:
        content = [{"type": "input_text", "text": text}]
        message = {"type": "message", "role": "user", "content": content}
        await send_event(ws, {"type": "conversation.item.create", "item": {**message, "id": item}})
        await recv_until(ws, "conversation.item.done")
    await send_event(ws, {"type": "response.create", "response": {"output_modalities": ["text"]}})
    return (await recv_until(ws, "response.done"))[-1]["response"]


def test_delete_over_websocket_equals_a_fresh_session(tiny_checkpoint: Path) -> None:
    """Real workers behind the real server: a session deletes an older exchange (its user
    item, then its reply), and its next reply (seeded sampling, as a client gets it) is the
    one of a session that never had them. A cancelled text reply leaves the model only the
    tokens whose text was sent."""
    tokenizer = load_processor(tiny_checkpoint).tokenizer

    async def run() -> None:
        short = {"type": "realtime", "seed": 11, "max_output_tokens": 6}
        seeded = {"type": "session.update", "session": short}
        async with running_server(tiny_engine) as server:
            async with server.ws() as ws:
                await send_event(ws, seeded)
                await recv_until(ws, "session.updated")
                first = await ws_reply(ws, "Remember the number seven.", "item_u1")
                second = await ws_reply(ws, "What did I ask you?", "item_u2")
                for item in ("item_u2", second["output"][0]["id"]):
                    await send_event(ws, {"type": "conversation.item.delete", "item_id": item})
                    await recv_until(ws, "conversation.item.deleted")
                after = await ws_reply(ws, "Say it again.", "item_u3")
                # a text reply cut short: the model keeps what was sent, no more
                long = {"output_modalities": ["text"], "max_output_tokens": 500}
                await send_event(ws, {"type": "response.create", "response": long})
                await recv_until(ws, "response.output_text.delta")
                await send_event(ws, {"type": "response.cancel"})
                done = (await recv_until(ws, "response.done"))[-1]["response"]
                (session,) = server.engine._sessions.values()  # the log a rebuild replays
                kept = session.replay._last_reply().tokens
                assert done["status"] == "cancelled"
                assert tokenizer.decode(kept, skip_special_tokens=True) == done["output"][0]["content"][0]["text"]
            async with server.ws() as ws:
                await send_event(ws, seeded)
                await recv_until(ws, "session.updated")
                fresh_first = await ws_reply(ws, "Remember the number seven.", "item_u1")
                fresh = await ws_reply(ws, "Say it again.", "item_u3")
        assert first["output"][0]["content"] == fresh_first["output"][0]["content"]
        assert after["output"][0]["content"] == fresh["output"][0]["content"]
        assert after["output"][0]["content"] != second["output"][0]["content"]

    asyncio.run(run())


def test_replay_log_forgets_items() -> None:
    """The log's side of a delete: an input item goes from its turn; a reply goes and its
    turn runs into the next (two user items in a row are one user turn); what is sent again
    starts at the item's turn."""
    from omni.engine import protocol as p
    from omni.engine.replay import ReplayLog

    log = ReplayLog("s", None, 10_000_000)

    def text(words: str) -> bytes:
        return p.encode(p.AddText("s", words))

    log.add_input(text("a"))
    log.label("u1")
    log.add_input(text("b"))
    log.label("u2", last_only=True)
    log.reply_started("r1", None, "a1")
    log.reply_finished("r1", [1, 2])
    log.add_input(text("c"))
    log.label("u3")
    log.reply_started("r2", None, "a2")
    log.reply_finished("r2", [3])
    log.add_input(text("d"))  # pending, not labelled yet

    def sent(from_turn: int | None = None) -> list[object]:
        out = []
        for data in log.messages(from_turn):
            msg = p.decode(data)
            out.append(msg.text if isinstance(msg, p.AddText) else msg.token_ids)
        return out

    assert sent() == ["a", "b", [1, 2], "c", [3], "d"]
    assert log.delete_item("u1") == 0 and sent(0) == ["b", [1, 2], "c", [3], "d"]
    assert log.delete_item("a1") == 0 and sent() == ["b", "c", [3], "d"]
    assert log.delete_item("a2") == 0 and sent() == ["b", "c", "d"]
    size = log.size
    assert log.delete_item("u3") == 0 and sent() == ["b", "d"] and log.size < size
    with pytest.raises(KeyError):  # a deleted item is gone
        log.delete_item("u3")
