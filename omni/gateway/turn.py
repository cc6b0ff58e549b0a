"""ICE servers for a call, with fresh time-limited TURN credentials.

A TURN server on the public internet must not relay for anyone, and a static password in a
web page is public. The "TURN REST API" scheme (draft-uberti-behave-turn-rest, what coturn
calls `use-auth-secret`) avoids both: the service and the TURN server share a secret; for
each client the service mints

    username   = "<unix expiry time>:<label>"
    credential = base64(HMAC-SHA1(secret, username))

and the TURN server recomputes the credential from the username and refuses it after the
expiry time. Nothing is stored and the secret never leaves the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from omni.settings import Settings

USER_LABEL = "omni"


def turn_credentials(secret: str, ttl_seconds: int, now: float | None = None) -> tuple[str, str]:
    """(username, credential) valid for `ttl_seconds` from `now`."""
    expires = int((time.time() if now is None else now) + ttl_seconds)
    username = f"{expires}:{USER_LABEL}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers_for_client(settings: Settings, now: float | None = None) -> list[dict[str, object]]:
    """The RTCIceServer list to hand to a page or client (and to use for the server's own peer
    connection): the configured `ice_servers` as they are, plus the `turn_urls` with
    credentials minted now. Call it per page load or per call, never once at startup: the
    credentials expire."""
    servers: list[dict[str, object]] = [dict(server) for server in settings.ice_servers]
    if settings.turn_urls and settings.turn_secret is not None:
        username, credential = turn_credentials(
            settings.turn_secret.get_secret_value(), settings.turn_credential_ttl_seconds, now
        )
        servers.append(
            {"urls": list(settings.turn_urls), "username": username, "credential": credential}
        )
    return servers
