"""Video on the audio clock (omni/engine/video_clock.py, omni/gateway/media_clock.py): each
camera frame stands for the video instant its capture time is nearest, however it arrives.
The timeline's choices, the gateway's mapping of media times, the stamps kept through the
engine's replay log, and the thinker on the tiny checkpoint (real transformers modules, in
this process): frames that come late and out of order with their times give the same
context as the same frames in order, and without times they would not.
"""

from __future__ import annotations

import asyncio
import fractions

import numpy as np
import pytest
import torch
from av import VideoFrame
from engine_helpers import thinker_conversation
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.checkpoints.processor import load_processor
from omni.engine import protocol as p
from omni.engine.api import ReplyDone, ReplyOptions, SessionOptions
from omni.engine.engine import EngineConfig, running_engine
from omni.engine.kv_memory import KVSlots
from omni.engine.replay import ReplayLog
from omni.engine.scheduler import StepScheduler
from omni.engine.thinker import ThinkerConversation, ThinkerStage
from omni.engine.video_clock import Frame, FrameTimeline
from omni.gateway.media_clock import CallClock

SLOT = 0.5  # seconds between the video's frames (2 fps)


def rgb(k: int) -> np.ndarray:
    return np.full((2, 2, 3), k, np.uint8)


def worst_jitter(times: list[float]) -> float:
    """How far frame k's capture was from instant k at most."""
    return max(abs(t - SLOT * k) for k, t in enumerate(times))


def chosen(timeline: FrameTimeline, instants: list[float]) -> list[int]:
    return [int(timeline.take(t)[0, 0, 0]) for t in instants]


def test_jittered_out_of_order_frames_stand_for_their_instants() -> None:
    rng = np.random.default_rng(0)
    times = [SLOT * k + rng.uniform(-0.2, 0.2) for k in range(12)]
    timeline = FrameTimeline(SLOT)
    order = [1, 0, 3, 2, 5, 4, 7, 6, 11, 9, 10, 8]  # pairs swapped, then a late burst
    instants = [SLOT * k for k in range(12)]
    got = []
    for step in range(3):  # each step takes its 4 instants once its frames have come
        for k in order[4 * step : 4 * step + 4]:
            timeline.add(Frame(rgb(k), times[k]))
        got += chosen(timeline, instants[4 * step : 4 * step + 4])
    assert got == list(range(12))
    assert timeline.worst_offset_s == pytest.approx(worst_jitter(times))


@pytest.mark.parametrize("rate", [1.03, 0.97])  # the camera's clock fast, then slow
def test_a_drifting_camera_stays_within_half_its_spacing(rate: float) -> None:
    timeline = FrameTimeline(SLOT)
    spacing = SLOT / rate
    for k in range(120):
        timeline.add(Frame(rgb(k % 256), 0.1 + k * spacing))
    chosen(timeline, [SLOT * g for g in range(100)])
    # arrival order would be 3 frames off by the end (100 slots * 3 % = 1.5 s); by time, at
    # most half a slot, or for a slow camera what a gap between its frames leaves
    assert timeline.worst_offset_s <= max(SLOT / 2, spacing - SLOT / 2) + 1e-9


def test_a_stalled_camera_holds_its_last_frame() -> None:
    timeline = FrameTimeline(SLOT)
    timeline.add(Frame(rgb(1), 0.0))
    timeline.add(Frame(rgb(2), 0.5))
    assert chosen(timeline, [0.0, 0.5, 1.0, 1.5, 2.0]) == [1, 2, 2, 2, 2]
    assert timeline.worst_offset_s == pytest.approx(1.5)  # the held frame, 1.5 s old
    timeline.add(Frame(rgb(3), 2.6))  # the camera is back
    assert chosen(timeline, [2.5]) == [3]


def test_frames_after_their_instant_wait_for_a_later_one() -> None:
    timeline = FrameTimeline(SLOT)
    timeline.add(Frame(rgb(1), 0.0))
    timeline.add(Frame(rgb(2), 1.0))  # not due at 0.5 (more than half a slot after)
    assert chosen(timeline, [0.0, 0.5, 1.0]) == [1, 1, 2]


def test_unstamped_frames_keep_arrival_order() -> None:
    timeline = FrameTimeline(SLOT)
    for k in [3, 1, 2]:
        timeline.add(Frame(rgb(k), None))
    assert chosen(timeline, [0.0, 0.5, 1.0, 1.5]) == [3, 1, 2, 2]
    assert timeline.worst_offset_s == 0.0
    timeline = FrameTimeline(SLOT)  # stamped frames, but a span whose audio has no time
    for k in [3, 1, 2]:
        timeline.add(Frame(rgb(k), float(k)))
    assert [int(timeline.take(None)[0, 0, 0]) for _ in range(3)] == [1, 2, 3]


def test_the_gateway_maps_camera_media_time_onto_the_audio_clock() -> None:
    def frame(pts: int, rate: int) -> VideoFrame:
        f = VideoFrame(2, 2, "rgb24")
        f.pts, f.time_base = pts, fractions.Fraction(1, rate)
        return f

    assert CallClock().video_time(frame(0, 90_000), arrived=10.0) is None  # no audio yet
    clock = CallClock()
    clock.audio_frame(frame(0, 48_000), arrived=10.25)
    clock.audio_frame(frame(960, 48_000), arrived=10.30)  # 20 ms of audio, 30 ms later: late
    # frames every 100 ms of media time, arriving with jitter and a late burst; the second
    # came soonest after its media time, so the camera's clock is anchored there from then on
    arrivals = [10.41, 10.48, 10.75, 10.76, 10.81]
    times = [clock.video_time(frame(9000 * (k + 1), 90_000), at) for k, at in enumerate(arrivals)]
    # on the audio clock: seconds after the microphone's first sample (10.25)
    assert times == pytest.approx([10.41 - 10.25, 0.23, 0.33, 0.43, 0.53])


def test_frame_timestamps_survive_the_replay_log() -> None:
    log = ReplayLog("s", None, 10**9)
    frame = p.AppendFrame("s", p.Array.of(rgb(5)), 1.25)
    audio = p.AppendAudio("s", p.Array.of(np.zeros(160, np.float32)), 0.5)
    for msg in (audio, frame):
        log.add_input(p.encode(msg))
    back = [p.decode(data) for data in log.messages()]
    assert [m.timestamp for m in back] == [0.5, 1.25]
    assert p.decode(p.encode(p.AppendFrame("s", p.Array.of(rgb(5))))).timestamp is None


# -- the thinker ----------------------------------------------------------------------------

PIECE = 1600  # 100 ms of 16 kHz audio
PIECES = 59  # 5.9 s: three audio chunks (the last one short), 6 video steps, 12 frames


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    torch.set_grad_enabled(False)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return model.thinker, load_processor(tiny_checkpoint)


def speech() -> np.ndarray:
    noise = np.random.default_rng(1).standard_normal(PIECE * PIECES)
    return (0.1 * noise).astype(np.float32)


def picture(k: int) -> np.ndarray:
    return np.random.default_rng(100 + k).integers(0, 255, (56, 56, 3), dtype=np.uint8)


CAPTURED = [SLOT * k + 0.13 * np.sin(k) for k in range(12)]  # a jittery camera
START = 30.0  # the speech begins 30 s into the call (the session's audio clock)
TEXT_ONLY = ReplyOptions(greedy=True, output_audio=False, max_text_tokens=1)


def first_logits(
    tiny, deliveries: dict[int, list[int]], stamped: bool
) -> tuple[ThinkerConversation, torch.Tensor]:
    """The reply's first logits after a turn of speech and camera frames; `deliveries`: which
    frames arrive before which 100 ms audio piece."""
    thinker, processor = tiny
    kv = KVSlots.for_model(thinker.config.text_config, 1, 2048, "cpu", torch.float32)
    conv = thinker_conversation(thinker, processor, lambda rows: None, kv)
    audio = speech()
    for n in range(PIECES):
        for k in deliveries.get(n, []):
            conv.append_video_frame(picture(k), START + CAPTURED[k] if stamped else None)
        conv.append_audio(audio[n * PIECE : (n + 1) * PIECE], START + n * PIECE / 16_000)
    conv.end_turn()
    reply = conv.start_reply(1, greedy=True)
    stage = ThinkerStage(thinker, kv, StepScheduler(256, 1))
    while not conv.can_choose():
        stage.step({"s": conv})
    assert reply.logits is not None
    return conv, reply.logits.clone()


def test_late_out_of_order_frames_with_times_give_the_in_order_context(tiny) -> None:
    in_order = {5 * k: [k] for k in range(12)}  # each frame as it is captured
    # frame 0 before the speech (it makes the speech a video), the others shuffled and late:
    # each 2-second chunk's frames come just before the audio that completes the chunk
    late = {0: [0], 19: [3, 1, 2], 39: [7, 5, 4, 6], 55: [11, 8, 10, 9]}
    conv, want = first_logits(tiny, in_order, stamped=True)
    assert conv.frame_offset_max_s == pytest.approx(worst_jitter(CAPTURED))
    _, unstamped = first_logits(tiny, in_order, stamped=False)
    assert torch.equal(unstamped, want)  # in order, the times change nothing
    late_conv, got = first_logits(tiny, late, stamped=True)
    assert torch.equal(got, want)
    assert late_conv.frame_offset_max_s == conv.frame_offset_max_s
    _, by_arrival = first_logits(tiny, late, stamped=False)
    assert not torch.allclose(by_arrival, want, atol=1e-4)  # what the times are for


def test_the_worst_offset_reaches_the_engines_heartbeat_stats(tiny_checkpoint) -> None:
    """Real workers: a stamped video turn, then `kv_stats["thinker"]["frame_offset_ms_max"]`
    (what the long-call bench reads)."""
    audio = speech()

    async def call() -> dict[str, int]:
        async with running_engine(EngineConfig(str(tiny_checkpoint))) as engine:
            await engine.open_session("s", SessionOptions())
            for n in range(PIECES):
                for k in {5 * k: [k] for k in range(12)}.get(n, []):
                    await engine.append_video_frame("s", picture(k), START + CAPTURED[k])
                piece = audio[n * PIECE : (n + 1) * PIECE]
                await engine.append_audio("s", piece, START + n * PIECE / 16_000)
            async for event in engine.respond("s", TEXT_ONLY):
                if isinstance(event, ReplyDone):
                    assert event.status == "completed", event.error
            before = engine.kv_stats.get("thinker")  # may be from before the turn's last steps
            while engine.kv_stats.get("thinker") is before:
                await asyncio.sleep(0.05)  # the next heartbeat (one a second), sent after them
            return engine.kv_stats["thinker"]

    stats = asyncio.run(asyncio.wait_for(call(), 300))
    assert stats["frame_offset_ms_max"] == round(1000 * worst_jitter(CAPTURED))
