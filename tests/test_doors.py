"""The doors: client secrets any replica can open (and nobody else can read or stretch),
/metrics on a listener of its own, calls that only their owner can end, no secret in any log
line, and no model work for a caller who did not check out. Real servers on real sockets,
with the scripted engine (these tests are about the gateway, not the model)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets
from fake_engine import FakeEngine, fake_engine
from realtime_helpers import API_KEY, RunningServer, recv_event, running_server

from omni.bench.calls import CallClient
from omni.gateway import auth
from omni.gateway.app import create_app
from omni.gateway.turn import turn_credentials
from omni.logs import configure_logging
from omni.settings import Settings

SHARED_KEY = "a-secret-every-replica-is-given-0123456789"
OTHER_KEY = "b" * 32  # another key's holder: no business with API_KEY's calls
SECRET_WORD = "PINEAPPLE-SUBMARINE"  # in the instructions: must not be readable from the ek_


def replica(**settings: Any) -> Any:
    """One replica of a deployment: its own server, the deployment's shared sealing key."""
    settings.setdefault("client_secret_key", SHARED_KEY)
    return running_server(fake_engine, **settings)


def base_url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def mint(server: RunningServer, key: str = API_KEY, **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        return await http.post("/v1/realtime/client_secrets", json=body, headers=bearer(key))


async def secret_value(server: RunningServer, **body: Any) -> str:
    minted = await mint(server, **body)
    assert minted.status_code == 200, minted.text
    value: str = minted.json()["value"]
    return value


async def refused(server: RunningServer, key: str) -> dict[str, Any]:
    """The 401 a WebSocket connection with `key` gets instead of the upgrade."""
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with server.ws(api_key=key):
            pass
    response = denied.value.response
    assert response.status_code == 401
    error: dict[str, Any] = json.loads(response.body)["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    return error


def opened_sessions(server: RunningServer) -> int:
    engine = server.engine
    assert isinstance(engine, FakeEngine)
    return sum(1 for name, _ in engine.calls if name == "open_session")


INSTRUCTED = {"type": "realtime", "instructions": f"The word is {SECRET_WORD}."}


# -- client secrets


async def test_a_secret_minted_on_one_replica_opens_a_session_on_another() -> None:
    async with replica() as one, replica() as two, running_server(fake_engine) as stranger:
        value = await secret_value(one, session=INSTRUCTED)
        async with two.ws(api_key=value) as ws:
            created = await recv_event(ws)
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == INSTRUCTED["instructions"]
        assert opened_sessions(one) == 0 and opened_sessions(two) == 1
        # a server sealing with another key (here its own random one) cannot open it
        assert (await refused(stranger, value))["message"] == "invalid client secret"


async def test_the_secret_hides_its_session_config() -> None:
    async with replica() as server:
        minted = await mint(server, session=INSTRUCTED)
    value = minted.json()["value"]
    assert value.startswith("ek_") and SECRET_WORD not in value
    sealed = base64.urlsafe_b64decode(value[3:] + "=" * (-len(value[3:]) % 4))
    assert SECRET_WORD.encode() not in sealed
    assert b"instructions" not in sealed and b"exp" not in sealed
    # the backend that minted it is told what the session will be; the browser needs `value`
    assert minted.json()["session"]["instructions"] == INSTRUCTED["instructions"]


async def test_an_altered_secret_is_refused() -> None:
    async with replica() as server:
        value = await secret_value(server)
        middle = len(value) // 2
        flipped = value[:middle] + ("A" if value[middle] != "A" else "B") + value[middle + 1 :]
        for bad in (flipped, value[:-4], "ek_", "ek_!!!!", value + "AAAA"):
            assert (await refused(server, bad))["message"] == "invalid client secret"
        async with httpx.AsyncClient(base_url=base_url(server)) as http:
            offer = await http.post(
                "/v1/realtime/calls",
                content="v=0\r\n",
                headers={**bearer(flipped), "Content-Type": "application/sdp"},
            )
        assert offer.status_code == 401 and offer.json()["error"]["code"] == "invalid_api_key"
        assert opened_sessions(server) == 0  # refused before any model work
        async with server.ws(api_key=value) as ws:  # the real one still works
            assert (await recv_event(ws))["type"] == "session.created"


async def test_an_expired_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async with replica() as server:
        minted = (await mint(server, expires_after={"anchor": "created_at", "seconds": 10})).json()
        later = minted["expires_at"] + 1
        # the clock that client secrets are checked against, moved past the expiry
        monkeypatch.setattr(auth, "time", types.SimpleNamespace(time=lambda: later))
        error = await refused(server, minted["value"])
        assert error["message"] == "the client secret has expired"
        assert opened_sessions(server) == 0


async def test_a_secret_opens_as_many_sessions_as_it_was_minted_for() -> None:
    async with replica() as server:
        twice = await secret_value(server, max_sessions=2)
        async with server.ws(api_key=twice) as first, server.ws(api_key=twice) as second:
            assert (await recv_event(first))["type"] == "session.created"
            assert (await recv_event(second))["type"] == "session.created"
        error = await refused(server, twice)
        assert error["message"] == "the client secret has opened all the 2 sessions it allows"
        assert opened_sessions(server) == 2

        once = await secret_value(server)  # one session unless asked for more
        async with server.ws(api_key=once) as ws:
            assert (await recv_event(ws))["type"] == "session.created"
        await refused(server, once)
        caller = CallClient(base_url(server), once)  # WebRTC counts the same
        assert (await caller.connect()).status_code == 401
        await caller.close()
        assert opened_sessions(server) == 3

        too_many = await mint(server, max_sessions=auth.MAX_SECRET_SESSIONS + 1)
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "max_sessions"


async def test_a_refused_connection_does_not_use_up_the_secret() -> None:
    async with replica(max_sessions=1) as server:
        once = await secret_value(server)
        async with server.ws() as holder:  # the server is full
            await recv_event(holder)
            async with server.ws(api_key=once) as turned_away:
                assert (await recv_event(turned_away))["error"]["code"] == "session_limit_reached"
        async with server.ws(api_key=once) as ws:  # room again: the secret's session is unused
            assert (await recv_event(ws))["type"] == "session.created"


def test_a_full_use_table_refuses_new_secrets_until_old_ones_expire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "MAX_TRACKED_SECRETS", 2)
    keys = auth.KeyStore([API_KEY], None)
    owner = keys.check(API_KEY)
    assert isinstance(owner, auth.Grant)
    short, long, new = (
        keys.check(keys.mint(owner, ttl, 1, None).value) for ttl in (10, 600, 600)
    )
    assert isinstance(short, auth.Grant) and isinstance(long, auth.Grant)
    assert isinstance(new, auth.Grant)
    assert keys.use(short) is None and keys.use(long) is None
    assert keys.use(new) == auth.Denied(
        "too many client secrets are in use on this server; try later"
    )
    later = short.expires_at + 1
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(time=lambda: later))
    assert keys.use(new) is None  # the expired one's place was freed
    assert keys.use(long) is not None  # ...and the others are still counted


async def test_a_secret_is_at_most_one_header_line() -> None:
    async with replica() as server:
        # random text barely compresses: this much still fits, sealed, in a header line...
        long = {"type": "realtime", "instructions": secrets.token_urlsafe(5600)}
        value = await secret_value(server, session=long)
        assert 7000 < len(value) <= auth.MAX_SECRET_CHARS
        protocols: Any = ["realtime", f"openai-insecure-api-key.{value}"]
        async with websockets.connect(server.ws_url, subprotocols=protocols) as ws:
            created = await recv_event(ws)
        assert created["session"]["instructions"] == long["instructions"]
        # ...and more is refused when minting, not when the browser connects
        noise = secrets.token_urlsafe(6000)
        minted = await mint(server, session={"type": "realtime", "instructions": noise})
    assert minted.status_code == 400
    assert minted.json()["error"]["code"] == "client_secret_too_large"


# -- /metrics


async def test_metrics_are_served_on_their_own_listener_only() -> None:
    async with replica() as server, httpx.AsyncClient() as http:
        assert server.gateway.metrics.port not in (None, server.port)
        assert (await http.get(f"{base_url(server)}/metrics")).status_code == 404
        metrics = await http.get(server.metrics_url)
    assert metrics.status_code == 200 and "omni_sessions_total 0.0" in metrics.text


async def test_a_taken_metrics_port_stops_the_start_saying_which_setting() -> None:
    async with replica() as server:
        taken = Settings(metrics_port=server.gateway.metrics.port)
        app = create_app(taken, engine_factory=fake_engine)
        with pytest.raises(OSError, match="set metrics_port"):
            async with app.router.lifespan_context(app):
                pass


# -- call ownership


@asynccontextmanager
async def placed(server: RunningServer, key: str) -> AsyncIterator[CallClient]:
    caller = CallClient(base_url(server), key)
    assert (await caller.connect()).status_code == 201
    try:
        yield caller
    finally:
        await caller.close()


async def hang_up(server: RunningServer, location: str | None, key: str) -> httpx.Response:
    assert location is not None
    async with httpx.AsyncClient(base_url=base_url(server)) as http:
        return await http.delete(location, headers=bearer(key))


async def test_only_the_caller_can_end_a_call() -> None:
    async with replica(api_keys=[API_KEY, OTHER_KEY]) as server:
        async with placed(server, API_KEY) as caller:
            other = await hang_up(server, caller.location, OTHER_KEY)
            unknown = await hang_up(server, "/v1/realtime/calls/rtc_nope", OTHER_KEY)
            # exactly what a call that does not exist gets, bar the id
            assert other.status_code == unknown.status_code == 404
            assert other.json()["error"]["code"] == unknown.json()["error"]["code"]
            assert len(server.gateway.sessions) == 1
            assert (await hang_up(server, caller.location, API_KEY)).status_code == 204
        assert server.gateway.sessions == set()

        # a call placed with a client secret belongs to the key that minted it
        value = await secret_value(server)
        async with placed(server, value) as caller:
            assert (await hang_up(server, caller.location, OTHER_KEY)).status_code == 404
            assert (await hang_up(server, caller.location, API_KEY)).status_code == 204
        # ...and its holder may end it too, its one session used or not; the holder of
        # another secret of the same key (another browser) may not
        value, another = await secret_value(server), await secret_value(server)
        async with placed(server, value) as caller:
            assert (await hang_up(server, caller.location, another)).status_code == 404
            assert (await hang_up(server, caller.location, value)).status_code == 204


# -- logs


async def test_no_secret_reaches_the_logs() -> None:
    """Every auth path at DEBUG, where the WebSocket library logs each handshake header."""
    turn_secret = "turn-shared-secret-0123456789"
    settings = {
        "api_keys": [API_KEY],
        "turn_urls": ["turn:127.0.0.1:9?transport=tcp"],  # refused at once: no relay to wait for
        "turn_secret": turn_secret,
        "log_level": "DEBUG",
    }
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    every_secret = Settings(client_secret_key=SHARED_KEY, **settings).secrets()
    configure_logging("DEBUG", "text", every_secret, out)
    try:
        async with replica(**settings) as server:
            # running_server quiets uvicorn; `omni serve --log-level debug` would not
            for name in ("uvicorn.error", "uvicorn.access"):
                logging.getLogger(name).setLevel(logging.DEBUG)
            minted = await secret_value(server, session=INSTRUCTED)
            page_value = await secret_value(server)
            async with server.ws() as ws:  # Bearer
                await recv_event(ws)
            protocols: Any = ["realtime", f"openai-insecure-api-key.{minted}"]
            async with websockets.connect(server.ws_url, subprotocols=protocols) as ws:
                await recv_event(ws)
            await refused(server, API_KEY + "x")
            async with httpx.AsyncClient(base_url=base_url(server)) as http:
                config = await http.get("/v1/realtime/calls/config", headers=bearer(page_value))
            async with placed(server, page_value) as caller:
                await caller.expect("session.created")
                assert (await hang_up(server, caller.location, page_value)).status_code == 204
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    text = out.getvalue()
    assert "< authorization: Bearer [redacted]" in text  # the header lines were there
    assert "openai-insecure-api-key.[redacted]" in text
    handed_out = config.json()["ice_servers"][0]["credential"]
    # every TURN credential minted (for the page and for the server's own ICE agent)
    minted_turn = [
        turn_credentials(turn_secret, 0, int(expiry))[1]
        for expiry in re.findall(r"(\d{10}):omni", text)
    ]
    for secret in [API_KEY, minted, page_value, SHARED_KEY, turn_secret, handed_out, *minted_turn]:
        assert secret not in text
    assert SECRET_WORD not in text
