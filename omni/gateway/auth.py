"""Who may open a session: API keys from settings, and short-lived client secrets for browsers.

Keys arrive as `Authorization: Bearer <key>` or, from browsers (which cannot set headers on a
WebSocket), as the `openai-insecure-api-key.<key>` subprotocol, both as OpenAI accepts them.
Static keys are compared in constant time. A browser should get an `ek_...` client secret
from its own backend (POST /v1/realtime/client_secrets with a real key) instead of a real key;
a secret may open sessions until it expires, and carries the session config it was minted with.
With no keys configured, auth is off (and the server binds loopback only; see serve.py).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from omni.session.client_events import SessionIn

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
SECRET_PREFIX = "ek_"


@dataclass(frozen=True)
class Grant:
    """A key that checked out: whether it is a real key, and any session config it carries."""

    static: bool
    session: SessionIn | None = None


@dataclass(frozen=True)
class ClientSecret:
    value: str
    expires_at: int
    session: SessionIn | None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def subprotocol_key(subprotocols: list[str]) -> str | None:
    for protocol in subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            return protocol.removeprefix(KEY_SUBPROTOCOL_PREFIX) or None
    return None


class KeyStore:
    def __init__(self, api_keys: list[str]) -> None:
        self._keys = [key.encode() for key in api_keys]
        self._secrets: dict[str, ClientSecret] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, key: str | None) -> Grant | None:
        """The grant for `key`, or None if it may not connect."""
        if key and key.startswith(SECRET_PREFIX):
            secret = self._live_secret(key)
            if secret is not None:
                return Grant(static=False, session=secret.session)
        if not self.enabled:
            return Grant(static=True)
        if key is None:
            return None
        given = key.encode()
        # compare with every key so the time taken says nothing about which one nearly matched
        matched = [hmac.compare_digest(given, known) for known in self._keys]
        return Grant(static=True) if any(matched) else None

    def mint(self, ttl_seconds: int, session: SessionIn | None) -> ClientSecret:
        now = time.time()
        self._secrets = {v: s for v, s in self._secrets.items() if s.expires_at > now}
        secret = ClientSecret(
            SECRET_PREFIX + secrets.token_urlsafe(24), int(now + ttl_seconds), session
        )
        self._secrets[secret.value] = secret
        return secret

    def _live_secret(self, value: str) -> ClientSecret | None:
        secret = self._secrets.get(value)
        if secret is None or secret.expires_at <= time.time():
            return None
        return secret
