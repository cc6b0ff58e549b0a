"""The two most used voice-agent frameworks, unchanged and with their defaults, against the
server: Pipecat's OpenAI Realtime LLM service and LiveKit Agents' OpenAI realtime plugin.

Only the URL and the API key point them here. Each holds a spoken turn (espeak-ng speech in,
reply audio out, ended by the server's turn detection: LiveKit's default is semantic_vad) and
a generate_reply-style turn (Pipecat: a context frame, LiveKit: `generate_reply`). Pipecat
runs in a real pipeline (PipelineWorker, WorkerRunner); LiveKit's RealtimeSession needs no
room, so it is driven directly, as an AgentSession drives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from livekit import rtc
from livekit.agents import llm as livekit_llm
from livekit.plugins.openai.realtime import RealtimeModel
from pipecat.frames import frames as pipecat_frames
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner
from realtime_helpers import API_KEY, TIMEOUT, RunningServer, chunks, silence, speech

from omni.session.turn_detection import max_wait_ms

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory
ENGINES = ("fake", "tiny")
QUESTION = "What is the capital of France?"
RATE = 24_000


def spoken_turn(trailing_ms: int) -> list[bytes]:
    """A question in 100 ms pcm16 chunks at 24 kHz, then silence longer than the VAD waits."""
    return chunks(silence(300) + speech(QUESTION) + silence(trailing_ms))


# -- Pipecat


class FrameLog(FrameProcessor):
    """Records the frames of one kind passing it one way (errors go upstream, replies down)."""

    def __init__(self, direction: FrameDirection, kind: type) -> None:
        super().__init__()
        self.direction, self.kind = direction, kind
        self.frames: asyncio.Queue[Any] = asyncio.Queue()

    async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction and isinstance(frame, self.kind):
            self.frames.put_nowait(frame)
        await self.push_frame(frame, direction)


class PipecatCall:
    def __init__(self, worker: PipelineWorker, replies: FrameLog, errors: FrameLog) -> None:
        self.worker, self.replies, self.errors = worker, replies, errors

    async def send(self, *frames: Any) -> None:
        await self.worker.queue_frames(frames)

    async def reply(self) -> list[Any]:
        """The frames of one response, up to its end; fails on any error frame."""
        got: list[Any] = []

        async def collect() -> list[Any]:
            end = pipecat_frames.LLMFullResponseEndFrame
            while not isinstance(frame := await self.replies.frames.get(), end):
                assert self.errors.frames.empty(), self.errors.frames.get_nowait()
                got.append(frame)
            assert self.errors.frames.empty(), self.errors.frames.get_nowait()
            return got

        return await asyncio.wait_for(collect(), TIMEOUT)


@asynccontextmanager
async def pipecat_call(server: RunningServer) -> AsyncIterator[PipecatCall]:
    """OpenAIRealtimeLLMService with its defaults in a running pipeline."""
    llm = OpenAIRealtimeLLMService(
        api_key=API_KEY, base_url=f"ws://127.0.0.1:{server.port}/v1/realtime"
    )
    errors = FrameLog(FrameDirection.UPSTREAM, pipecat_frames.ErrorFrame)
    replies = FrameLog(FrameDirection.DOWNSTREAM, pipecat_frames.Frame)
    worker = PipelineWorker(Pipeline([errors, llm, replies]), cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker: PipelineWorker, frame: Any) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), TIMEOUT)
        yield PipecatCall(worker, replies, errors)
    finally:
        await worker.queue_frame(pipecat_frames.EndFrame())
        await asyncio.wait_for(running, TIMEOUT)


def pipecat_audio(frames: list[Any]) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, pipecat_frames.TTSAudioRawFrame))


async def test_pipecat_spoken_turn(server: RunningServer) -> None:
    async with pipecat_call(server) as call:
        await call.send(
            *(
                pipecat_frames.InputAudioRawFrame(audio=chunk, sample_rate=RATE, num_channels=1)
                for chunk in spoken_turn(trailing_ms=1200)
            )
        )
        frames = await call.reply()
    audio = pipecat_audio(frames)
    assert len(audio) >= 2 * RATE // 50  # at least one 20 ms codec frame of reply speech
    assert any(isinstance(f, pipecat_frames.TTSStoppedFrame) for f in frames)


async def test_pipecat_generate_reply_from_a_context(server: RunningServer) -> None:
    context = LLMContext(messages=[{"role": "user", "content": "Say hello to the caller."}])
    async with pipecat_call(server) as call:
        await call.send(pipecat_frames.LLMContextFrame(context=context))
        frames = await call.reply()
    text = "".join(f.text for f in frames if isinstance(f, pipecat_frames.TTSTextFrame))
    assert text and pipecat_audio(frames)


# -- LiveKit Agents


@asynccontextmanager
async def livekit_session(server: RunningServer) -> AsyncIterator[Any]:
    """The plugin's RealtimeModel with its defaults (semantic_vad, voice "marin", ...)."""
    model = RealtimeModel(api_key=API_KEY, base_url=server.base_url)
    session = model.session()
    errors: list[Any] = []
    session.on("error", errors.append)
    try:
        yield session
    finally:
        await session.aclose()
        await model.aclose()
    assert not errors, errors


async def livekit_reply(generation: livekit_llm.GenerationCreatedEvent) -> tuple[str, int]:
    """A generation's transcript and how many samples of reply audio it held."""
    samples, text = 0, []

    async def read() -> None:
        nonlocal samples
        async for message in generation.message_stream:
            async for frame in message.audio_stream:
                assert (frame.sample_rate, frame.num_channels) == (RATE, 1)
                samples += frame.samples_per_channel
            text.extend([piece async for piece in message.text_stream])

    await asyncio.wait_for(read(), TIMEOUT)
    return "".join(text), samples


async def test_livekit_spoken_turn(server: RunningServer) -> None:
    async with livekit_session(server) as session:
        generations: asyncio.Queue[livekit_llm.GenerationCreatedEvent] = asyncio.Queue()
        session.on("generation_created", generations.put_nowait)
        # semantic_vad at LiveKit's default eagerness (medium) ends the turn
        for chunk in spoken_turn(trailing_ms=max_wait_ms("medium") + 700):
            session.push_audio(rtc.AudioFrame(chunk, RATE, 1, len(chunk) // 2))
        generation = await asyncio.wait_for(generations.get(), TIMEOUT)
        assert not generation.user_initiated  # the server's turn detection started it
        _, samples = await livekit_reply(generation)
    assert samples >= RATE // 50


async def test_livekit_generate_reply(server: RunningServer) -> None:
    async with livekit_session(server) as session:
        generation = await asyncio.wait_for(
            session.generate_reply(instructions="Greet the caller."), TIMEOUT
        )
        assert generation.user_initiated
        text, samples = await livekit_reply(generation)
    assert text and samples >= RATE // 50
