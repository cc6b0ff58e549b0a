"""Truncation keeps the words the heard audio spoke, not one text token per 20 ms codec step.

The rule itself (omni/engine/heard.py), then over a WebSocket through the real worker
processes on the tiny checkpoint: a reply cut at 30 % of its audio keeps about 30 % of its
tokens, and the item's transcript, the model's context and the replay log agree.
"""

from __future__ import annotations

from typing import Any

import pytest
from gateway_fixtures import tiny_engine
from realtime_helpers import RunningServer, recv_until, running_server, send_event
from transformers import AutoTokenizer

from omni.engine.engine import OmniEngine
from omni.engine.heard import PRIOR_CODES_PER_TOKEN, SpeakingRate, SpokenReply, heard_tokens


def test_speech_that_ended_itself_is_heard_in_proportion() -> None:
    reply = SpokenReply(40, 500, ended_itself=True, delta_ends=list(range(1, 41)))
    assert heard_tokens(reply, 3000, PRIOR_CODES_PER_TOKEN) == 12  # 150 of 500 codes: 30 %
    assert heard_tokens(reply, 10_000, PRIOR_CODES_PER_TOKEN) == 40
    assert heard_tokens(reply, 10_000 * 2, PRIOR_CODES_PER_TOKEN) == 40  # never past the end
    assert heard_tokens(reply, 0, PRIOR_CODES_PER_TOKEN) == 0


def test_stopped_speech_covers_what_the_speaking_rate_allows() -> None:
    # 100 tokens of text, but the speech stopped after 120 codes: about 10 tokens were said
    reply = SpokenReply(100, 120, ended_itself=False, delta_ends=list(range(1, 101)))
    assert heard_tokens(reply, 120 * 20, 12.0) == 10
    assert heard_tokens(reply, 60 * 20, 12.0) == 5
    # the session's own rate, once a reply's speech ended by itself
    rate = SpeakingRate()
    rate.add(SpokenReply(10, 200, ended_itself=True))
    rate.add(SpokenReply(10, 50, ended_itself=False))  # cut short: says nothing of the rate
    assert rate.codes_per_token == 20.0
    assert heard_tokens(reply, 120 * 20, rate.codes_per_token) == 6


def test_a_cut_falls_between_the_deltas_the_client_was_sent() -> None:
    # two-token deltas (a character split over tokens): 5 heard tokens keep 4
    reply = SpokenReply(10, 100, ended_itself=True, delta_ends=[2, 4, 6, 8, 10])
    assert heard_tokens(reply, 50 * 20, PRIOR_CODES_PER_TOKEN) == 4
    assert heard_tokens(SpokenReply(3, 0, True, [1, 2, 3]), 1000, PRIOR_CODES_PER_TOKEN) == 0


@pytest.mark.asyncio
async def test_a_reply_cut_at_30_percent_of_its_audio_keeps_30_percent_of_its_tokens() -> None:
    async with running_server(tiny_engine) as server:
        engine = server.engine
        assert isinstance(engine, OmniEngine)  # the worker processes, not a script
        async with server.ws() as ws:
            await recv_until(ws, "session.created")
            await send_event(ws, user_text("Tell me about the weather."))
            # 16 text tokens; the tiny talker speaks until its 250-code cap (5 s): 20 ms a
            # token would put all 16 in the first 320 ms
            await send_event(ws, {"type": "response.create", "response": {"max_output_tokens": 16}})
            done = (await recv_until(ws, "response.done"))[-1]["response"]
            assert done["status"] == "completed"
            item = done["output"][0]
            full = item["content"][0]["transcript"]
            details = done["usage"]["output_token_details"]
            tokens, codes = details["text_tokens"], details["audio_tokens"]
            assert tokens >= 10 and codes >= 10 * tokens
            cut_ms = codes * 20 * 3 // 10
            await send_event(ws, truncate(item["id"], cut_ms))
            truncated = (await recv_until(ws, "conversation.item.truncated"))[-1]
            assert truncated["audio_end_ms"] == cut_ms
            await send_event(ws, {"type": "conversation.item.retrieve", "item_id": item["id"]})
            retrieved = (await recv_until(ws, "conversation.item.retrieved"))[-1]["item"]
            kept = kept_tokens(server)
        assert abs(len(kept) / tokens - 0.3) <= 0.1
        # the transcript is the text of exactly the tokens the model kept
        transcript = retrieved["content"][0]["transcript"]
        tokenizer = AutoTokenizer.from_pretrained(engine.config.model_path)
        assert transcript == tokenizer.decode(kept, skip_special_tokens=True)
        assert full.startswith(transcript) and len(transcript) < len(full)


def kept_tokens(server: RunningServer) -> list[int]:
    """The last reply's tokens in the engine's replay log: what the thinker confirmed it kept."""
    engine = server.engine
    assert isinstance(engine, OmniEngine)
    (session,) = engine._sessions.values()
    turn = session.replay._last_reply()
    assert turn is not None
    return turn.tokens


def user_text(text: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    }


def truncate(item_id: str, audio_end_ms: int) -> dict[str, Any]:
    return {
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": audio_end_ms,
    }
