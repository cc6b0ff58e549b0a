"""conversation.item.delete for any item, through the real worker processes on the tiny
checkpoint: after deleting an older user item or an older reply, the next greedy reply is
the one a fresh conversation built without that item gives (the thinker rewinds to the
item's turn and is sent the rest of the replay log again: recomputed, not evicted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
