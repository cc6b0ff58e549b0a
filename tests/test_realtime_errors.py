"""Bad input over a raw WebSocket: each gets an `error` naming the problem and the client's
event_id, and the session goes on with nothing it already had lost (the audio appended
before the bad message can still be committed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from realtime_helpers import (
    b64,
    data_url,
    image_bytes,
    recv_event,
    recv_until,
    send_event,
    silence,
)

MAX_MESSAGE = 64 * 1024
MANUAL = {
    "type": "session.update",
    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
}

CASES: dict[str, tuple[Any, str, str | None]] = {
    # name: (message, error code, param)
    "malformed_json": (
        '{"type": "input_audio_buffer.commit", "event_id": "ev1"',
        "invalid_json",
        None,
    ),
    "not_an_object": ("[1, 2, 3]", "invalid_event", None),
    "unknown_type": (
        {"type": "input_audio_buffer.explode", "event_id": "ev1"},
        "unknown_event",
        "type",
    ),
    "no_type": ({"event_id": "ev1", "audio": ""}, "missing_field", "type"),
    "missing_audio": (
        {"type": "input_audio_buffer.append", "event_id": "ev1"},
        "missing_field",
        "audio",
    ),
    "missing_truncate_fields": (
        {
            "type": "conversation.item.truncate",
            "event_id": "ev1",
            "item_id": "x",
            "content_index": 0,
        },
        "missing_field",
        "audio_end_ms",
    ),
    "wrong_field_type": (
        {"type": "input_audio_buffer.append", "event_id": "ev1", "audio": 5},
        "invalid_value",
        "audio",
    ),
    "bad_base64": (
        {"type": "input_audio_buffer.append", "event_id": "ev1", "audio": "%%% not base64 %%%"},
        "invalid_base64",
        "audio",
    ),
    "odd_length_audio": (
        {"type": "input_audio_buffer.append", "event_id": "ev1", "audio": b64(b"\x01\x02\x03")},
        "invalid_audio",
        "audio",
    ),
    "unsupported_rate": (
        {
            "type": "session.update",
            "event_id": "ev1",
            "session": {
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}},
            },
        },
        "invalid_value",
        "session.audio.input.format.rate",
    ),
    "camera_frame_not_an_image": (
        {
            "type": "input_image_buffer.append",
            "event_id": "ev1",
            "image": b64(b"\xff\xd8 not a jpeg"),
        },
        "invalid_image",
        "image",
    ),
    "item_image_not_an_image": (
        {
            "type": "conversation.item.create",
            "event_id": "ev1",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_image", "image_url": data_url(b"GIF8")}],
            },
        },
        "invalid_image",
        "item.content.0.image_url",
    ),
    "oversized": (
        {"type": "input_audio_buffer.append", "event_id": "ev1", "audio": b64(silence(2000))},
        "message_too_large",
        None,
    ),
    "truncate_unknown_item": (
        {
            "type": "conversation.item.truncate",
            "event_id": "ev1",
            "item_id": "item_nope",
            "content_index": 0,
            "audio_end_ms": 10,
        },
        "item_not_found",
        "item_id",
    ),
    "retrieve_unknown_item": (
        {"type": "conversation.item.retrieve", "event_id": "ev1", "item_id": "item_nope"},
        "item_not_found",
        "item_id",
    ),
    "cancel_without_response": (
        {"type": "response.cancel", "event_id": "ev1"},
        "response_cancel_not_active",
        None,
    ),
    "assistant_item": (
        {
            "type": "conversation.item.create",
            "event_id": "ev1",
            "item": {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hi"}],
            },
        },
        "unsupported",
        "item.role",
    ),
    "output_clear_over_websocket": (
        {"type": "output_audio_buffer.clear", "event_id": "ev1"},
        "unsupported",
        None,
    ),
}

pytest_plugins = ["gateway_fixtures"]  # server, start_server, engine_factory


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_is_named_and_nothing_is_lost(start_server: Any, case: str) -> None:
    message, code, param = CASES[case]
    async with start_server(max_message_bytes=MAX_MESSAGE) as server, server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(ws, MANUAL)
        await recv_until(ws, "session.updated")
        await send_event(ws, {"type": "input_audio_buffer.append", "audio": b64(silence(500))})
        await ws.send(message if isinstance(message, str) else json.dumps(message))
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == code, error
        assert error["param"] == param
        assert error["message"]
        if code != "invalid_event":  # only a JSON object can carry an event_id
            assert error["event_id"] == "ev1"
        await send_event(ws, {"type": "input_audio_buffer.commit", "event_id": "after"})
        after = await recv_event(ws)
        assert after["type"] == "input_audio_buffer.committed", after


async def test_binary_messages_are_refused(server: Any) -> None:
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        await ws.send(b"\x00\x01")
        assert (await recv_until(ws, "error"))[-1]["error"]["code"] == "invalid_event"
        await send_event(
            ws, {"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "e2"}
        )
        assert (await recv_until(ws, "error"))[-1]["error"]["event_id"] == "e2"


async def test_camera_frame_before_any_audio_is_out_of_order(server: Any) -> None:
    async with server.ws() as ws:
        await recv_until(ws, "session.created")
        await send_event(
            ws, {"type": "input_image_buffer.append", "image": b64(image_bytes()), "event_id": "f"}
        )
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert (error["code"], error["event_id"]) == ("image_before_audio", "f")


async def test_a_rejected_session_update_changes_nothing(server: Any) -> None:
    async with server.ws() as ws:
        before = (await recv_until(ws, "session.created"))[-1]["session"]
        await send_event(
            ws,
            {
                "type": "session.update",
                "event_id": "u1",
                "session": {
                    "type": "realtime",
                    "instructions": "new",
                    "audio": {"output": {"voice": "nobody"}},
                },
            },
        )
        assert (await recv_until(ws, "error"))[-1]["error"]["param"] == "session.audio.output.voice"
        await send_event(ws, {"type": "session.update", "session": {"type": "realtime"}})
        after = (await recv_until(ws, "session.updated"))[-1]["session"]
        assert after["instructions"] == before["instructions"] == ""
        assert after["audio"] == before["audio"]
