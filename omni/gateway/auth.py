"""Who may open a session: API keys from settings, and short-lived client secrets for browsers.

Keys arrive as `Authorization: Bearer <key>` or, from browsers (which cannot set headers on a
WebSocket), as the `openai-insecure-api-key.<key>` subprotocol, both as OpenAI accepts them.
Static keys are compared in constant time. With no keys configured, auth is off (and the
server binds loopback only; see serve.py).

A browser should get an `ek_...` client secret from its own backend (POST
/v1/realtime/client_secrets with a real key) instead of a real key. The secret is sealed,
not looked up: its expiry, its session count, the identity that minted it and the session
config it carries (instructions included) are encrypted and authenticated with AES-GCM under
`client_secret_key`, which all replicas share, so any replica can open it and the browser
holding it can read none of it. The one thing kept in memory is how many sessions each secret
has opened on this replica (replicas share no state, so a secret allowed N sessions may open
N on each replica), bounded by MAX_TRACKED_SECRETS; past that, new secrets are refused until
older ones expire.

Each grant names an owner (a hash of the API key, or for a client secret the key that minted
it) so a caller can only act on its own calls (`Grant.may_manage`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import logging
import secrets
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from omni.session.client_events import SessionIn

log = logging.getLogger(__name__)

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
SECRET_PREFIX = "ek_"
MAX_SECRET_SESSIONS = 100  # the most sessions one client secret may be minted for
MAX_TRACKED_SECRETS = 65_536  # client secrets whose use counts one replica keeps at once
# a secret travels in one header line, and websockets (the WebSocket handshake) allows 8 KiB
MAX_SECRET_CHARS = 8000
ANONYMOUS = "anonymous"  # everyone's identity when auth is off
_NONCE_BYTES = 12
_FORMAT = b"omni ek v1"  # authenticated with each secret: a later format cannot be mistaken


@dataclass(frozen=True)
class Grant:
    """A key that checked out: whether it is a real key, whose it is, and for a client secret
    the session config it carries and what it may still open."""

    static: bool
    owner: str
    session: SessionIn | None = None
    secret_id: str | None = None
    max_sessions: int = 0
    expires_at: int = 0

    def may_manage(self, placed_with: Grant) -> bool:
        """Whether this caller may act on a call placed with `placed_with`: an API key on the
        calls of its own client secrets too; a client secret only on its own calls (a backend
        hands one secret to each browser, and browsers must not end each other's calls)."""
        if self.static:
            return self.owner == placed_with.owner
        return self.secret_id == placed_with.secret_id


@dataclass(frozen=True)
class Denied:
    """A key that did not check out, and why (safe to show the caller: it never echoes keys)."""

    message: str


@dataclass(frozen=True)
class ClientSecret:
    value: str
    expires_at: int
    max_sessions: int


class SecretTooLarge(ValueError):
    """The session config does not fit in a client secret."""


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


def key_owner(key: str) -> str:
    """A stable name for an API key's holder, the same on every replica, that is not the key."""
    return "key_" + hashlib.sha256(b"omni owner\0" + key.encode()).hexdigest()[:32]


def sealing_key(secret: SecretStr) -> bytes:
    """The AES-256 key for client secrets, derived from the shared setting of any length."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_FORMAT)
    return hkdf.derive(secret.get_secret_value().encode())


class KeyStore:
    def __init__(self, api_keys: list[str], client_secret_key: SecretStr | None) -> None:
        self._keys = [key.encode() for key in api_keys]
        if client_secret_key is None:
            if self.enabled:
                log.warning(
                    "client_secret_key is not set: client secrets minted here work on this "
                    "replica only (set OMNI_CLIENT_SECRET_KEY, the same on every replica)"
                )
            self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        else:
            self._aead = AESGCM(sealing_key(client_secret_key))
        self._uses: dict[str, int] = {}  # secret id -> sessions opened here
        self._expiries: list[tuple[int, str]] = []  # heap of (expires_at, secret id)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, key: str | None) -> Grant | Denied:
        """The grant for `key`, or why it may not connect. A client secret that has opened all
        its sessions still checks out (its holder may hang up its call); `use` refuses it."""
        if key and key.startswith(SECRET_PREFIX):
            opened = self._open(key)
            if isinstance(opened, Grant) or self.enabled:
                return opened
        if not self.enabled:
            return Grant(static=True, owner=ANONYMOUS)
        if key is None:
            return Denied("missing API key (Authorization: Bearer <key>)")
        given = key.encode()
        # compare with every key so the time taken says nothing about which one nearly matched
        matched = [hmac.compare_digest(given, known) for known in self._keys]
        if not any(matched):
            return Denied("invalid API key")
        return Grant(static=True, owner=key_owner(key))

    def use(self, grant: Grant) -> Denied | None:
        """Count one session opened with `grant` (nothing to count for an API key): checks and
        counts at once, so two connections cannot both take a secret's last session."""
        if grant.secret_id is None:
            return None
        self._forget_expired()
        uses = self._uses.get(grant.secret_id, 0)
        if uses >= grant.max_sessions:
            return Denied(
                f"the client secret has opened all the {grant.max_sessions} sessions it allows"
            )
        if uses == 0:
            if len(self._uses) >= MAX_TRACKED_SECRETS:
                return Denied("too many client secrets are in use on this server; try later")
            heapq.heappush(self._expiries, (grant.expires_at, grant.secret_id))
        self._uses[grant.secret_id] = uses + 1
        return None

    def mint(
        self, minter: Grant, ttl_seconds: int, max_sessions: int, session: SessionIn | None
    ) -> ClientSecret:
        """A client secret for `minter`'s calls. Raises SecretTooLarge."""
        expires_at = int(time.time() + ttl_seconds)
        payload = {
            "id": secrets.token_urlsafe(12),
            "owner": minter.owner,
            "exp": expires_at,
            "max": max_sessions,
            "session": session.model_dump(mode="json", exclude_unset=True) if session else None,
        }
        # compressed: long instructions must still fit in one header line
        plain = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 9)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plain, _FORMAT)
        value = SECRET_PREFIX + base64.urlsafe_b64encode(sealed).decode().rstrip("=")
        if len(value) > MAX_SECRET_CHARS:
            raise SecretTooLarge(
                f"the session config makes a client secret of {len(value)} characters, over "
                f"{MAX_SECRET_CHARS} (one header line): shorten the instructions"
            )
        return ClientSecret(value, expires_at, max_sessions)

    def _open(self, value: str) -> Grant | Denied:
        text = value.removeprefix(SECRET_PREFIX)
        try:
            sealed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            nonce, box = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
            payload = json.loads(zlib.decompress(self._aead.decrypt(nonce, box, _FORMAT)))
        except (binascii.Error, ValueError, InvalidTag):
            # not ours: made up, altered, or sealed with another replica's key
            return Denied("invalid client secret")
        if payload["exp"] <= time.time():
            return Denied("the client secret has expired")
        session = payload["session"]
        return Grant(
            static=False,
            owner=payload["owner"],
            session=None if session is None else SessionIn.model_validate(session),
            secret_id=payload["id"],
            max_sessions=payload["max"],
            expires_at=payload["exp"],
        )

    def _forget_expired(self) -> None:
        now = time.time()
        while self._expiries and self._expiries[0][0] <= now:
            _, secret_id = heapq.heappop(self._expiries)
            del self._uses[secret_id]

