"""Wire-level pieces of a session: event validation, session config in both shapes, GA→beta
renames, audio decoding and images."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from realtime_helpers import image_bytes

from omni.engine.resample import ulaw_encode
from omni.session.client_events import ResponseIn, SessionIn, parse_client_event
from omni.session.config import SessionConfig, session_shape
from omni.session.errors import RealtimeError
from omni.session.images import decode_base64_image, decode_image_url
from omni.session.response import ReplyPlan
from omni.session.shape import to_beta
from omni.session.wire_audio import (
    PCM16K,
    PCM24K,
    AudioDecoder,
    AudioFormat,
    b64decode,
    decode_clip,
)
from omni.settings import Settings


def config() -> SessionConfig:
    return SessionConfig.from_settings(Settings(), "m")


def error_of(call: object, *args: object) -> RealtimeError:
    with pytest.raises(RealtimeError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


# -- client events


def test_unknown_and_untyped_events_are_named() -> None:
    assert error_of(parse_client_event, {"type": "nope", "event_id": "e1"}).code == "unknown_event"
    err = error_of(parse_client_event, {"event_id": "e2"})
    assert (err.code, err.param, err.event_id) == ("missing_field", "type", "e2")
    assert error_of(parse_client_event, [1, 2]).code == "invalid_event"


def test_missing_and_invalid_fields_name_the_param() -> None:
    err = error_of(
        parse_client_event, {"type": "conversation.item.truncate", "item_id": "x", "event_id": "e3"}
    )
    assert (err.code, err.event_id) == ("missing_field", "e3")
    assert err.param in ("content_index", "audio_end_ms")
    err = error_of(
        parse_client_event,
        {
            "type": "session.update",
            "session": {"audio": {"input": {"turn_detection": {"threshold": 3}}}},
        },
    )
    assert (err.code, err.param) == (
        "invalid_value",
        "session.audio.input.turn_detection.threshold",
    )


def test_extra_fields_are_ignored() -> None:
    event = parse_client_event({"type": "input_audio_buffer.commit", "future_field": 1})
    assert event.type == "input_audio_buffer.commit"


# -- session config


def test_ga_update_nested_audio_config() -> None:
    event = parse_client_event(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "be brief",
                "output_modalities": ["text"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 16000},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 700},
                    },
                    "output": {"voice": "ethan"},
                },
            },
        }
    )
    assert session_shape(event.session) == "ga"
    new = config().updated(event.session)
    assert new.instructions == "be brief" and new.voice == "Ethan" and not new.audio_out
    assert new.input_format == PCM16K
    assert new.turn_detection is not None and new.turn_detection.silence_duration_ms == 700
    assert new.turn_detection.threshold == 0.5  # the rest keeps its defaults
    wire = new.to_wire("ga", "sess_1", 0)
    assert wire["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}
    assert wire["output_modalities"] == ["text"] and wire["type"] == "realtime"


def test_turn_detection_null_turns_vad_off() -> None:
    ga = parse_client_event(
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
        }
    )
    assert config().updated(ga.session).turn_detection is None
    beta = parse_client_event({"type": "session.update", "session": {"turn_detection": None}})
    assert session_shape(beta.session) == "beta"
    assert config().updated(beta.session).turn_detection is None
    untouched = parse_client_event({"type": "session.update", "session": {"instructions": "x"}})
    assert session_shape(untouched.session) is None
    assert config().updated(untouched.session).turn_detection is not None


def test_beta_flat_fields_and_qwen_dialect() -> None:
    openai_beta = SessionIn.model_validate(
        {"modalities": ["text", "audio"], "input_audio_format": "pcm16", "voice": "Chelsie"}
    )
    new = config().updated(openai_beta)
    assert new.input_format.rate == 24000 and new.audio_out
    assert new.to_wire("beta", "s", 0)["input_audio_format"] == "pcm16"
    newer = config().updated(
        SessionIn.model_validate({"input_audio_format": "pcm", "output_audio_format": "pcm"})
    )
    assert newer.qwen and newer.input_format.rate == 16000 and newer.output_format.rate == 24000
    qwen = SessionIn.model_validate({"input_audio_format": "pcm16", "output_audio_format": "pcm24"})
    new = config().updated(qwen)
    assert new.qwen and new.input_format.rate == 16000  # Qwen's "pcm16" means 16 kHz
    assert new.to_wire("beta", "s", 0)["output_audio_format"] == "pcm24"
    g711 = config().updated(SessionIn.model_validate({"input_audio_format": "g711_ulaw"}))
    assert g711.input_format == AudioFormat("pcmu", 8000, "g711_ulaw")


@pytest.mark.parametrize(
    "session, code, param",
    [
        (
            {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}},
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {"audio": {"input": {"format": {"type": "audio/flac"}}}},
            "invalid_value",
            "session.audio.input.format.type",
        ),
        (
            {"audio": {"output": {"format": {"type": "audio/pcmu"}}}},
            "unsupported",
            "session.audio.output.format",
        ),
        ({"audio": {"output": {"voice": "robot"}}}, "invalid_value", "session.audio.output.voice"),
        ({"voice": "robot"}, "invalid_value", "session.voice"),
        ({"input_audio_format": "mp3"}, "invalid_value", "session.input_audio_format"),
    ],
)
def test_bad_session_updates_are_refused_whole(session: dict, code: str, param: str) -> None:
    before = config()
    err = error_of(before.updated, SessionIn.model_validate({"instructions": "changed", **session}))
    assert (err.code, err.param) == (code, param)
    assert before.instructions is None  # immutable: nothing was applied


def test_response_overrides() -> None:
    request = ResponseIn.model_validate(
        {
            "instructions": "shout",
            "output_modalities": ["text"],
            "metadata": {"k": "v"},
            "max_output_tokens": 7,
        }
    )
    plan = ReplyPlan.from_request(config(), request)
    options = plan.reply_options()
    assert (options.output_audio, options.instructions, options.max_text_tokens) == (
        False,
        "shout",
        7,
    )
    beta = ReplyPlan.from_request(
        config(), ResponseIn.model_validate({"modalities": ["audio", "text"], "voice": "Ethan"})
    )
    assert beta.audio_out and beta.voice == "Ethan"
    assert (
        error_of(ReplyPlan.from_request, config(), ResponseIn(conversation="none")).code
        == "unsupported"
    )


# -- shapes


def test_to_beta_renames_events_and_content() -> None:
    item = {
        "id": "i",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_audio", "transcript": "hi"}],
    }
    assert (
        to_beta({"type": "response.output_audio.delta", "delta": "x"})["type"]
        == "response.audio.delta"
    )
    assert (
        to_beta({"type": "response.output_text.done", "text": "x"})["type"] == "response.text.done"
    )
    added = to_beta({"type": "conversation.item.added", "item": item})
    assert (
        added["type"] == "conversation.item.created"
        and added["item"]["content"][0]["type"] == "audio"
    )
    assert to_beta({"type": "conversation.item.done", "item": item}) is None
    done = to_beta(
        {
            "type": "response.done",
            "response": {
                "output_modalities": ["audio"],
                "output": [item],
                "audio": {"output": {"voice": "Ethan"}},
            },
        }
    )
    assert (
        done["response"]["modalities"] == ["text", "audio"] and done["response"]["voice"] == "Ethan"
    )
    assert "output_modalities" not in done["response"]


# -- audio


def test_streaming_decode_matches_whole_clip() -> None:
    tone = (np.sin(np.arange(24000) * 2 * np.pi * 440 / 24000) * 12000).astype("<i2").tobytes()
    decoder = AudioDecoder(PCM24K)
    streamed = np.concatenate(
        [decoder.decode(tone[i : i + 4800]) for i in range(0, len(tone), 4800)] + [decoder.flush()]
    )
    whole = decode_clip(tone, PCM24K, "audio")
    assert len(streamed) == len(whole) == 16000
    np.testing.assert_allclose(streamed, whole, atol=1e-4)


def test_pcm16_at_16k_passes_through_and_g711_decodes() -> None:
    samples = np.array([0, 1000, -1000, 32767], dtype="<i2")
    out = AudioDecoder(PCM16K).decode(samples.tobytes())
    np.testing.assert_allclose(out * 32768, samples, atol=1)
    law = AudioDecoder(AudioFormat("pcmu", 8000))
    pcm = np.concatenate([law.decode(ulaw_encode(np.full(8000, 8000, np.int16))), law.flush()])
    assert len(pcm) == 16000 and abs(np.median(pcm) - 8000 / 32768) < 0.01


def test_bad_audio_is_named() -> None:
    assert error_of(AudioDecoder(PCM24K).decode, b"\x00\x01\x02").code == "invalid_audio"
    assert error_of(AudioDecoder(PCM24K).decode, b"").code == "invalid_audio"
    assert error_of(b64decode, "not base64!!", "audio").code == "invalid_base64"
    assert error_of(b64decode, 12, "audio").code == "invalid_value"


# -- images


def test_images_decode_or_are_refused() -> None:
    px = 1_000_000
    jpeg = base64.b64encode(image_bytes(64, 48)).decode()
    assert decode_base64_image(jpeg, "image", px).shape == (48, 64, 3)
    png = base64.b64encode(image_bytes(10, 20, "PNG")).decode()
    assert decode_image_url(f"data:image/png;base64,{png}", "p", px).shape == (20, 10, 3)
    gif = base64.b64encode(b"GIF89a-not-really").decode()
    assert error_of(decode_base64_image, gif, "image", px).code == "invalid_image"
    assert error_of(decode_image_url, "https://example.com/cat.jpg", "p", px).code == "invalid_value"
    assert error_of(decode_image_url, "data:image/png,rawbytes", "p", px).code == "invalid_value"


def test_large_images_are_scaled_to_the_pixel_cap() -> None:
    big = base64.b64encode(image_bytes(4000, 3000)).decode()  # JPEG: decoded at reduced scale
    rgb = decode_base64_image(big, "image", 1280 * 28 * 28)
    assert rgb.shape[0] * rgb.shape[1] <= 1280 * 28 * 28
    assert abs(rgb.shape[1] / rgb.shape[0] - 4 / 3) < 0.01
    wide = base64.b64encode(image_bytes(3000, 100, "PNG")).decode()
    assert decode_base64_image(wide, "image", 30_000).shape == (31, 948, 3)
