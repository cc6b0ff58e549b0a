"""Service settings: one flat, typed, documented list, read from `OMNI_*` environment variables.

pydantic-settings gives validation, env parsing and (later) CLI flags and config files from
the same field list, so each setting is declared once. Fields stay flat with a description
each, so a flag (`--max-sessions`), an env var (`OMNI_MAX_SESSIONS`) and a config-file key
(`max_sessions`) can all be derived from the field name.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOST = "127.0.0.1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNI_", extra="ignore")

    # -- serving
    host: str = Field(
        LOOPBACK_HOST, description="Address to bind (forced to 127.0.0.1 when no API keys are set)."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0: any free port).")
    model: str = Field(
        "auto",
        description="Preset, checkpoint directory or hub id ('auto': real if present, else tiny).",
    )
    served_model_name: str = Field(
        "qwen2.5-omni",
        description="Model name reported in session objects when the client names none.",
    )

    # -- auth
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (env: comma-separated). None: no auth, loopback only.",
    )
    client_secret_ttl_seconds: int = Field(
        600,
        ge=10,
        le=7200,
        description="Default lifetime of keys from /v1/realtime/client_secrets.",
    )

    # -- caps
    max_sessions: int = Field(
        16, ge=1, description="Concurrent realtime sessions; more are refused."
    )
    max_session_seconds: float = Field(
        1800.0, gt=0, description="A session is closed after this long."
    )
    max_message_bytes: int = Field(
        15 * 1024 * 1024,
        ge=1024,
        description="Largest client WebSocket message (OpenAI allows 15 MiB).",
    )
    max_buffered_audio_seconds: float = Field(
        120.0, gt=0, description="Most uncommitted user audio a session holds; more is refused."
    )

    # -- turn detection defaults (OpenAI's server_vad defaults)
    vad_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Silero speech probability that starts speech."
    )
    vad_prefix_padding_ms: int = Field(
        300, ge=0, description="Audio kept from before detected speech."
    )
    vad_silence_duration_ms: int = Field(
        500, ge=0, description="Silence that ends the user's turn."
    )

    # -- WebRTC calls
    ice_servers: list[dict[str, str | list[str]]] = Field(
        default_factory=list,
        description="STUN/TURN servers for calls, as RTCIceServer objects (env: a JSON list); "
        "none by default: calls on one host or LAN need none, and no public server is contacted.",
    )
    video_max_fps: float = Field(
        2.0, gt=0, le=2, description="Camera/screen frames per second given to the model."
    )
    video_max_side: int = Field(
        448, ge=28, description="Longest side, in pixels, a camera/screen frame is scaled to."
    )
    call_idle_timeout_seconds: float = Field(
        20.0, gt=0, description="A call whose caller sent no media for this long is hung up."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # env vars carry one string; a comma list is easier to write than JSON
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
