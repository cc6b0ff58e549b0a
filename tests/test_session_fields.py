"""Every GA session field the official clients and the agent frameworks send is accepted and
echoed; only a value outside the protocol is refused, and the error names the field. The
last test sends LiveKit Agents' default session.update over a WebSocket to the real worker
processes on the tiny checkpoint and holds a spoken turn under it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fake_engine import FakeEngine
from realtime_helpers import b64, chunks, recv_until, send_event, silence, speech

from omni.session.client_events import SessionIn, parse_client_event
from omni.session.config import SessionConfig
from omni.session.errors import RealtimeError
from omni.session.response import ReplyPlan
from omni.session.turn_detection import max_wait_ms
from omni.settings import Settings

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory
ENGINES = ("fake", "tiny")

# what livekit-plugins-openai 1.8.9's RealtimeModel() sends first, with every default
LIVEKIT_DEFAULT_SESSION: dict[str, Any] = {
    "type": "realtime",
    "audio": {
        "input": {
            "format": {"rate": 24000, "type": "audio/pcm"},
            "noise_reduction": None,
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {
                "type": "semantic_vad",
                "create_response": True,
                "eagerness": "medium",
                "interrupt_response": True,
            },
        },
        "output": {"format": {"rate": 24000, "type": "audio/pcm"}, "speed": 1.0, "voice": "marin"},
    },
    "max_output_tokens": "inf",
    "model": "gpt-realtime",
    "output_modalities": ["audio"],
    "tool_choice": "auto",
    "tracing": None,
}


def config() -> SessionConfig:
    return SessionConfig.from_settings(Settings(), "m")


def update(session: dict[str, Any]) -> SessionConfig:
    """A session.update through the event parser and the config, as the server takes it."""
    event = parse_client_event({"type": "session.update", "session": session})
    return config().updated(event.session)


def refusal(session: dict[str, Any]) -> RealtimeError:
    with pytest.raises(RealtimeError) as caught:
        update(session)
    return caught.value


def test_livekit_defaults_are_accepted_and_echoed() -> None:
    new = update(LIVEKIT_DEFAULT_SESSION)
    wire = new.to_wire("ga", "s", 0)
    audio_in = wire["audio"]["input"]
    assert audio_in["turn_detection"] == LIVEKIT_DEFAULT_SESSION["audio"]["input"]["turn_detection"]
    assert audio_in["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert audio_in["noise_reduction"] is None
    assert wire["audio"]["output"]["voice"] == "Chelsie"  # OpenAI's names speak as the default
    assert (wire["max_output_tokens"], wire["tool_choice"]) == ("inf", "auto")
    assert wire["tracing"] is None
    assert wire["output_modalities"] == ["audio"] and new.max_output_tokens is None
    assert new.turn_detection is not None
    assert new.turn_detection.silence_duration_ms == max_wait_ms("medium")


@pytest.mark.parametrize("eagerness", ["low", "medium", "high", "auto"])
def test_semantic_vad_eagerness_sets_the_longest_wait(eagerness: str) -> None:
    new = update({"turn_detection": {"type": "semantic_vad", "eagerness": eagerness}})
    assert new.turn_detection is not None
    silence_ms = new.turn_detection.silence_duration_ms
    # the VAD's own stop is the longest wait; the prosodic policy usually ends the turn sooner
    assert silence_ms == max_wait_ms(eagerness)  # type: ignore[arg-type]
    assert new.to_wire("beta", "s", 0)["turn_detection"]["eagerness"] == eagerness


def test_eagerness_orders_the_windows_and_server_vad_comes_back_whole() -> None:
    windows = [max_wait_ms(e) for e in ("high", "medium", "low")]
    assert windows == sorted(windows) and len(set(windows)) == 3
    assert max_wait_ms("auto") == max_wait_ms("medium")
    semantic = update({"turn_detection": {"type": "semantic_vad", "eagerness": "low"}})
    vad = SessionIn.model_validate({"turn_detection": {"type": "server_vad"}})
    back = semantic.updated(vad).turn_detection
    assert back is not None and back == config().vad_defaults  # not low's 8 s window
    partial = semantic.updated(SessionIn.model_validate({"turn_detection": {"eagerness": "high"}}))
    assert partial.turn_detection is not None and partial.turn_detection.type == "semantic_vad"
    assert partial.turn_detection.silence_duration_ms == max_wait_ms("high")


def test_every_advisory_field_is_kept_and_echoed() -> None:
    session = {
        "type": "realtime",
        "audio": {
            "input": {
                "noise_reduction": {"type": "far_field"},
                "transcription": {"model": "whisper-1", "language": "fr", "prompt": "Paris"},
                "turn_detection": {
                    "type": "server_vad",
                    "idle_timeout_ms": 6000,
                    "create_response": False,
                    "interrupt_response": False,
                },
            },
            "output": {"speed": 1.25},
        },
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "weather"},
        "tracing": {"workflow_name": "calls", "group_id": "g", "metadata": {"k": "v"}},
        "include": ["item.input_audio_transcription.logprobs"],
        "prompt": {"id": "pmpt_1", "version": "2", "variables": {"city": "Paris"}},
        "max_output_tokens": 77,
    }
    new = update(session)
    assert new.transcription is not None and new.transcription.language == "fr"
    wire = new.to_wire("ga", "s", 0)
    audio_in = wire["audio"]["input"]
    assert audio_in["noise_reduction"] == {"type": "far_field"}
    assert audio_in["transcription"] == session["audio"]["input"]["transcription"]
    detection = audio_in["turn_detection"]
    assert (detection["idle_timeout_ms"], detection["create_response"]) == (6000, False)
    assert wire["audio"]["output"]["speed"] == 1.25
    assert wire["tools"] == []  # accepted, never called: the echo says none are in effect
    assert wire["tool_choice"] == session["tool_choice"]
    assert (wire["tracing"], wire["include"]) == (session["tracing"], session["include"])
    assert (wire["prompt"], wire["max_output_tokens"]) == (session["prompt"], 77)
    assert update({"tracing": "auto"}).to_wire("ga", "s", 0)["tracing"] == "auto"
    cleared = new.updated(
        SessionIn.model_validate(
            {"audio": {"input": {"noise_reduction": None, "transcription": None}}, "tracing": None}
        )
    ).to_wire("ga", "s", 0)
    assert cleared["audio"]["input"]["noise_reduction"] is None
    assert cleared["audio"]["input"]["transcription"] is None and cleared["tracing"] is None


def test_beta_names_of_the_same_fields() -> None:
    session = {
        "modalities": ["text", "audio"],
        "voice": "alloy",
        "input_audio_transcription": {"model": "whisper-1"},
        "input_audio_noise_reduction": {"type": "near_field"},
        "turn_detection": {"type": "semantic_vad", "eagerness": "high"},
        "tool_choice": "none",
        "tools": [],
        "max_response_output_tokens": "inf",
        "speed": 0.5,
    }
    wire = update(session).to_wire("beta", "s", 0)
    assert wire["input_audio_transcription"] == {"model": "whisper-1"}
    assert wire["input_audio_noise_reduction"] == {"type": "near_field"}
    assert wire["turn_detection"]["type"] == "semantic_vad" and wire["voice"] == "Chelsie"
    assert (wire["tool_choice"], wire["max_response_output_tokens"], wire["speed"]) == (
        "none",
        "inf",
        0.5,
    )


@pytest.mark.parametrize(
    "session, param",
    [
        (
            {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "fast"}}}},
            "session.audio.input.turn_detection.eagerness",
        ),
        ({"turn_detection": {"type": "word_vad"}}, "session.turn_detection.type"),
        (
            {"audio": {"input": {"turn_detection": {"idle_timeout_ms": -1}}}},
            "session.audio.input.turn_detection.idle_timeout_ms",
        ),
        (
            {"audio": {"input": {"noise_reduction": {"type": "studio"}}}},
            "session.audio.input.noise_reduction.type",
        ),
        ({"input_audio_noise_reduction": {}}, "session.input_audio_noise_reduction.type"),
        (
            {"audio": {"input": {"transcription": {"language": 5}}}},
            "session.audio.input.transcription.language",
        ),
        (
            {"input_audio_transcription": {"prompt": "x" * 5000}},
            "session.input_audio_transcription.prompt",
        ),
        ({"tracing": "on"}, "session.tracing"),
        ({"tracing": {"workflow_name": 3}}, "session.tracing.workflow_name"),
        ({"tool_choice": "sometimes"}, "session.tool_choice"),
        ({"tool_choice": {"type": "function"}}, "session.tool_choice.name"),
        ({"tools": [{"type": "web_search"}]}, "session.tools.0.type"),
        ({"include": ["everything"]}, "session.include.0"),
        ({"prompt": {"version": "1"}}, "session.prompt.id"),
        ({"max_output_tokens": "infinite"}, "session.max_output_tokens"),
        ({"audio": {"output": {"speed": 3.0}}}, "session.audio.output.speed"),
        ({"voice": "robot"}, "session.voice"),
    ],
)
def test_values_outside_the_protocol_are_refused_by_name(
    session: dict[str, Any], param: str
) -> None:
    err = refusal({"instructions": "changed", **session})
    assert err.param == param and err.code in ("invalid_value", "missing_field"), err.message
    assert param.split(".")[-1] in err.message


def test_a_response_may_name_tools_as_livekit_generate_reply_does() -> None:
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
    event = parse_client_event(
        {
            "type": "response.create",
            "response": {"instructions": "hi", "tools": tools, "tool_choice": "auto"},
        }
    )
    assert ReplyPlan.from_request(config(), event.response).instructions == "hi"
    with pytest.raises(RealtimeError) as caught:
        parse_client_event({"type": "response.create", "response": {"tool_choice": "always"}})
    assert caught.value.param == "response.tool_choice"


async def test_livekit_default_session_update_over_a_websocket(server: Any) -> None:
    session = copy.deepcopy(LIVEKIT_DEFAULT_SESSION)
    session["audio"]["output"]["voice"] = "Ethan"  # the one setting a LiveKit user changes
    session["instructions"] = "You are a helpful voice assistant."
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(ws, {"type": "session.update", "session": session})
        updated = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert updated["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        assert updated["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
        assert updated["audio"]["output"]["voice"] == "Ethan"
        assert updated["output_modalities"] == ["audio"] and updated["max_output_tokens"] == "inf"
        # medium eagerness: the trailing silence is longer than its window
        trailing = max_wait_ms("medium") + 700
        audio = silence(300) + speech("What is the capital of France?") + silence(trailing)
        for chunk in chunks(audio):
            await send_event(ws, {"type": "input_audio_buffer.append", "audio": b64(chunk)})
        events = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    assert "response.output_audio.delta" in kinds
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["audio"]["output"]["voice"] == "Ethan"
    if isinstance(server.engine, FakeEngine):
        options = server.engine.conversation().replies[0]
        assert options.voice == "Ethan" and options.output_audio
