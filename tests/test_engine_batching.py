"""Batching through the real worker processes on the tiny checkpoint.

- Three sessions with different inputs reply at once, each equal to generate() for it alone.
- A session with a long input to prefill does not hold up another session's reply: the
  scheduler runs the other's decode rows in every step beside chunks of the long prefill, so
  the short session's reply is done before the long one's first token (an order, not a time).
- A session beyond the KV slots is refused with EngineCapacityError; the others go on.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import generate_latest
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.bench.reference import ReferenceConversation
from omni.checkpoints.processor import load_processor
from omni.engine.api import EngineCapacityError, ReplyDone, ReplyOptions, SessionOptions, TextDelta
from omni.engine.engine import EngineConfig, running_engine
from omni.metrics import Metrics

TEXT, CODES = 8, 30
QUESTIONS = ["Hello!", "What is the capital of France, and why is it famous?", "Count to three."]


async def reply(engine, session: str, log: list[tuple[str, str]] | None = None) -> ReplyDone:
    options = ReplyOptions(
        greedy=True, max_text_tokens=TEXT, min_text_tokens=TEXT, max_codec_tokens=CODES, min_codec_tokens=CODES
    )
    done = None
    async for event in engine.respond(session, options):
        if log is not None and isinstance(event, TextDelta):
            log.append((session, "text"))
        if isinstance(event, ReplyDone):
            done = event
    assert done is not None and done.status == "completed", done
    if log is not None:
        log.append((session, "done"))
    return done


def test_concurrent_sessions_equal_generate(tiny_checkpoint):
    async def run() -> list[ReplyDone]:
        async with running_engine(EngineConfig(model_path=str(tiny_checkpoint), kv_slots=4)) as engine:
            for i, question in enumerate(QUESTIONS):
                await engine.open_session(f"s{i}", SessionOptions())
                await engine.add_text(f"s{i}", question)
            return await asyncio.gather(*(reply(engine, f"s{i}") for i in range(len(QUESTIONS))))

    replies = asyncio.run(run())
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = load_processor(tiny_checkpoint)
    torch.set_grad_enabled(False)
    for question, got in zip(QUESTIONS, replies):
        reference = ReferenceConversation(model, processor)
        reference.user_turn(text=question)
        want = reference.generate(
            max_text_tokens=TEXT, min_text_tokens=TEXT, max_codec_tokens=CODES, min_codec_tokens=CODES
        )
        assert got.text_token_ids == want.text_ids, question
        assert got.codec_tokens == want.codes, question
    torch.set_grad_enabled(True)


def test_long_prefill_does_not_hold_up_another_reply(tiny_checkpoint):
    long_text = " ".join(f"line {i} of a long pasted document." for i in range(600))  # ~6k tokens

    async def run() -> list[tuple[str, str]]:
        config = EngineConfig(model_path=str(tiny_checkpoint), kv_slots=2, step_token_budget=64)
        async with running_engine(config) as engine:
            await engine.open_session("long", SessionOptions())
            await engine.open_session("short", SessionOptions())
            await engine.add_text("short", "Hi")
            log: list[tuple[str, str]] = []
            await engine.add_text("long", long_text)  # queued first
            await asyncio.gather(reply(engine, "long", log), reply(engine, "short", log))
            return log

    log = asyncio.run(run())
    assert log.index(("short", "done")) < log.index(("long", "text"))


def test_sessions_over_the_kv_slots_are_refused(tiny_checkpoint):
    async def run() -> ReplyDone:
        async with running_engine(EngineConfig(model_path=str(tiny_checkpoint), kv_slots=2)) as engine:
            await engine.open_session("a", SessionOptions())
            await engine.open_session("b", SessionOptions())
            with pytest.raises(EngineCapacityError, match="capacity"):
                await engine.open_session("c", SessionOptions())
            await engine.close_session("b")
            await engine.open_session("c", SessionOptions())  # a freed slot is reused
            await engine.add_text("c", "Hello")
            done = await reply(engine, "c")
            # the workers report their KV memory in heartbeats (about once a second)
            metrics = Metrics()
            metrics.watch_engine(lambda: engine)
            for _ in range(50):
                await asyncio.sleep(0.1)
                text = generate_latest(metrics.registry).decode()
                if all(f'omni_kv_slots_used{{stage="{w}"}} 2.0' in text for w in ("thinker", "talker")):
                    break
            assert 'omni_kv_slots_used{stage="thinker"} 2.0' in text
            assert 'omni_kv_slots_used{stage="talker"} 2.0' in text
            stats = engine.kv_stats["thinker"]
            assert 0 < stats["bytes_used"] < stats["bytes_total"]
            return done

    assert asyncio.run(run()).text_tokens == TEXT
