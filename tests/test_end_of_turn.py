"""semantic_vad: the prosodic end-of-turn scorer, the eagerness wait policy, the input buffer
that applies them on the audio clock, and a semantic turn end over a WebSocket on the tiny
workers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from realtime_helpers import RunningServer, b64, chunks, recv_until, send_event, silence, speech

from omni.bench import turns as turns_bench
from omni.bench.turns import SENTENCES, detection, run_turn, spoken
from omni.cli import build_parser
from omni.engine.api import INPUT_SAMPLE_RATE
from omni.session.end_of_turn import end_probability, prosody
from omni.session.turn_detection import FLOOR_MS, MAX_WAIT_MS, max_wait_ms, wait_ms

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory
ENGINES = ("tiny",)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is needed (apt-get install espeak-ng)"
)
EAGERNESS_ORDER = ("high", "medium", "low")  # from the shortest wait to the longest


@needs_espeak
@pytest.mark.parametrize("first, rest", SENTENCES[:10])
def test_a_clean_end_scores_higher_than_a_mid_sentence_pause(first: str, rest: str) -> None:
    """The sentence spoken to its full stop (pitch fallen, voice fading) against its first
    half spoken as going on (ending on a comma)."""
    clean = end_probability(spoken(f"{first} {rest}"))
    going_on = end_probability(spoken(f"{first},"))
    assert 0.0 <= going_on < clean <= 1.0


@needs_espeak
def test_clean_ends_have_fallen_pitch_and_faded_voice() -> None:
    found_ends = [prosody(spoken(f"{first} {rest}")) for first, rest in SENTENCES[:10]]
    found_pauses = [prosody(spoken(f"{first},")) for first, _ in SENTENCES[:10]]
    ends = [e for e in found_ends if e is not None]
    pauses = [p for p in found_pauses if p is not None]
    assert len(ends) == len(pauses) == 10
    assert np.mean([e.final_pitch for e in ends]) < np.mean([p.final_pitch for p in pauses])
    assert np.mean([e.energy_drop for e in ends]) < np.mean([p.energy_drop for p in pauses])


def test_no_voice_scores_one_half() -> None:
    assert prosody(np.zeros(INPUT_SAMPLE_RATE, np.float32)) is None
    assert end_probability(np.zeros(100, np.float32)) == 0.5


def test_wait_shrinks_as_p_rises_and_grows_as_eagerness_falls() -> None:
    ps = np.linspace(0.0, 1.0, 21)
    for eagerness in MAX_WAIT_MS:
        waits = [wait_ms(float(p), eagerness) for p in ps]
        assert waits == sorted(waits, reverse=True) and len(set(waits)) > 10
        assert waits[0] == max_wait_ms(eagerness) and waits[-1] == FLOOR_MS
        assert all(FLOOR_MS <= w <= max_wait_ms(eagerness) for w in waits)
    for p in ps:
        by_eagerness = [wait_ms(float(p), e) for e in EAGERNESS_ORDER]
        assert by_eagerness == sorted(by_eagerness)
        assert wait_ms(float(p), "auto") == wait_ms(float(p), "medium")
    assert [max_wait_ms(e) for e in EAGERNESS_ORDER] == [2000, 4000, 8000]  # OpenAI's


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_p_outside_zero_one_is_refused(p: float) -> None:
    with pytest.raises(ValueError, match="p must be in"):
        wait_ms(p, "medium")


@needs_espeak
async def test_a_clean_end_stops_well_before_the_longest_wait() -> None:
    """Low eagerness waits up to 8 s; a sentence that sounds finished ends much sooner, and
    the stop names where the speech ended."""
    words = spoken("We bought a new car because the old one broke down.")
    audio = np.concatenate([np.zeros(4800, np.float32), words])
    events = await run_turn(audio, detection("low"), until_stop=False)
    kinds = [kind for kind, _ in events.events]
    assert kinds == ["started", "paused", "stopped"]
    assert events.stopped_at is not None
    waited_ms = (events.stopped_at - len(audio)) * 1000 / INPUT_SAMPLE_RATE
    assert waited_ms < max_wait_ms("low") / 2
    assert events.audio_end_ms is not None
    assert abs(events.audio_end_ms - len(audio) * 1000 / INPUT_SAMPLE_RATE) < 300


@needs_espeak
async def test_speech_after_a_pause_cancels_the_end() -> None:
    """A pause that sounds unfinished waits longer than the caller's pause: they go on, the
    pending end is dropped, and the one turn ends after all their words."""
    first, rest = "After dinner we usually", "take a walk along the river."
    head = spoken(f"{first},")
    gap = np.zeros(INPUT_SAMPLE_RATE, np.float32)  # 1 s
    audio = np.concatenate([np.zeros(4800, np.float32), head, gap, spoken(rest)])
    events = await run_turn(audio, detection("medium"), until_stop=False)
    kinds = [kind for kind, _ in events.events]
    assert kinds[:3] == ["started", "paused", "resumed"] and kinds.count("started") == 1
    assert kinds[-1] == "stopped" and kinds.count("stopped") == 1
    assert events.stopped_at is not None and events.stopped_at > len(audio)


@needs_espeak
async def test_server_vad_ignores_the_scorer() -> None:
    """server_vad stops after its own 500 ms whatever the voice sounds like: a mid-sentence
    pause of 1 s ends the turn there."""
    head = spoken("After dinner we usually,")
    audio = np.concatenate([np.zeros(4800, np.float32), head, np.zeros(16000, np.float32)])
    events = await run_turn(audio, detection(None), until_stop=True)
    assert events.stopped_at is not None
    waited_ms = (events.stopped_at - 4800 - len(head)) * 1000 / INPUT_SAMPLE_RATE
    assert 500 <= waited_ms < 1000


async def test_semantic_vad_ends_a_turn_over_a_websocket(server: RunningServer) -> None:
    """On the tiny workers: low eagerness (8 s at most) and 3 s of silence after a sentence
    that sounds finished; only the prosodic end can end this turn, and the model replies."""
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        detection_in = {"type": "semantic_vad", "eagerness": "low"}
        await send_event(
            ws, {"type": "session.update", "session": {"turn_detection": detection_in}}
        )
        updated = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert updated["turn_detection"]["eagerness"] == "low"
        words = speech("We bought a new car because the old one broke down.")
        for chunk in chunks(silence(300) + words + silence(3000)):
            await send_event(ws, {"type": "input_audio_buffer.append", "audio": b64(chunk)})
        events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    assert events[-1]["response"]["status"] == "completed"
    assert any(e["type"] in ("response.audio.delta", "response.output_audio.delta") for e in events)


@needs_espeak
async def test_the_turns_bench_counts_false_ends_and_delays(tmp_path: Path) -> None:
    """`omni bench turns` is wired into the CLI, and its rows count what the buffer did: a
    paused turn and a clean one of the same sentence under server_vad."""
    args = build_parser().parse_args(["bench", "turns", "--json", str(tmp_path / "t.json")])
    assert args.run is turns_bench.run
    paused, clean = turns_bench.make_turns()[:2]
    assert paused.pause is not None and clean.pause is None
    row = await turns_bench.measure_mode("server_vad", None, "fitted", [paused, clean])
    assert (row.paused_turns, row.false_ends, row.clean_turns, row.never_ended) == (1, 1, 1, 0)
    assert row.end_ms_p50 is not None and 500 <= row.end_ms_p50 < 1000
    assert "| server_vad | fitted | 1/1 (100%) |" in turns_bench.table([row])
