"""A call the model has no KV memory for is refused up front, on both transports.

The real engine on the tiny checkpoint with one KV slot behind a server that allows more
sessions: the first call takes the slot; a second WebSocket session gets a
`server_at_capacity` error event and close code 1013 (try again later), a second WebRTC offer
gets HTTP 503 with the same code; the first call keeps working throughout.
"""

from __future__ import annotations

import json

import httpx
from realtime_helpers import API_KEY, running_server
from test_webrtc_errors import offer

from omni.checkpoints.tiny import ensure_tiny_checkpoint
from omni.engine.engine import EngineConfig, running_engine


def one_slot_engine():
    return running_engine(EngineConfig(model_path=str(ensure_tiny_checkpoint()), kv_slots=1))


async def test_calls_beyond_the_kv_slots_are_refused_clearly():
    async with running_server(one_slot_engine, max_sessions=4) as server:
        async with server.ws() as first:
            assert json.loads(await first.recv())["type"] == "session.created"
            async with server.ws() as second:
                event = json.loads(await second.recv())
                assert event["type"] == "error"
                assert event["error"]["code"] == "server_at_capacity"
                assert "KV memory" in event["error"]["message"]
                await second.wait_closed()
                assert second.close_code == 1013
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                refused = await http.post(
                    "/v1/realtime/calls",
                    content=await offer(),
                    headers={
                        "Content-Type": "application/sdp",
                        "Authorization": f"Bearer {API_KEY}",
                    },
                )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_at_capacity"
            # the call that holds the slot still answers
            update = {"type": "session.update", "session": {"type": "realtime", "instructions": "Hi"}}
            await first.send(json.dumps(update))
            assert json.loads(await first.recv())["type"] == "session.updated"
