"""Service settings: one flat, typed, documented list, read from flags, `OMNI_*` environment
variables and a TOML config file.

pydantic-settings gives validation, env parsing, CLI flags and file sources from the same
field list, so each setting is declared once: a flag (`--max-sessions`), an env var
(`OMNI_MAX_SESSIONS`) and a config-file key (`max_sessions`) are all derived from the field
name, and the README's table is generated from the descriptions (`settings_table`).

Precedence, highest first: flags, environment, config file, defaults. The file is TOML:
Python reads it with the stdlib (no dependency), the project already keeps its presets and
packaging in TOML, and TOML has no implicit typing (YAML reads `no` as false and `1e3` as a
string or a float depending on the parser). Unknown keys in the file are errors, not silently
ignored, so a typo cannot leave a production setting at its default.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

LOOPBACK_HOST = "127.0.0.1"
ENV_PREFIX = "OMNI_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    config: Path | None = Field(
        None,
        description="TOML file of settings (keys are the names below, e.g. `max_sessions = 8`); "
        "environment variables and flags override it.",
    )

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

    # -- engine
    device: str = Field(
        "auto",
        description="Torch device for the model workers: auto (first GPU(s), else CPU), cpu, cuda, "
        "cuda:N.",
    )
    talker_device: str | None = Field(
        None,
        description="A separate device for the talker and the vocoder (e.g. cuda:1); default: "
        "as chosen by `device`.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype: auto is bfloat16 on GPU, float32 on CPU."
    )
    cpu_threads: int = Field(
        1,
        ge=1,
        description="Torch threads per worker process on CPU (the thinker and the "
        "talker run side by side: keep their sum at or below the cores).",
    )
    engine_start_timeout_seconds: float = Field(
        900.0, gt=0, description="Longest wait for the workers to load the model at start."
    )
    engine_heartbeat_timeout_seconds: float = Field(
        30.0, gt=0, description="A worker silent this long is taken as hung and restarted."
    )
    engine_replay_max_mb: float = Field(
        32.0,
        gt=0,
        description="Per session, the most input and reply a worker restart can replay to "
        "rebuild the conversation (MB; audio is 0.064 MB/s, a 448 px frame 0.6 MB); over it, "
        "the oldest turns are dropped.",
    )
    engine_max_frame_side: int = Field(
        448, ge=28, description="Longest side, in pixels, of video frames the thinker patches."
    )
    vocoder_steps: int = Field(
        10,
        ge=2,
        le=100,
        description="Token2Wav ODE time points per chunk, as transformers' num_steps (10: 9 "
        "solver steps, so 36 DiT passes with rk4, 9 with euler).",
    )
    vocoder_first_chunk_steps: int | None = Field(
        None,
        ge=2,
        le=100,
        description="ODE time points for a reply's first chunk only (fewer: sooner first "
        "audio); default: as `vocoder_steps`.",
    )
    vocoder_solver: Literal["auto", "rk4", "euler"] = Field(
        "auto",
        description="Token2Wav ODE solver: rk4 as transformers (36 DiT passes per chunk), "
        "euler as Qwen's streaming code (9); auto is rk4 on GPU, euler on CPU.",
    )
    max_batch: int = Field(
        16,
        ge=1,
        description="Most sessions in one batched model step (thinker, talker); 1 turns "
        "batching off.",
    )
    step_token_budget: int = Field(
        512,
        ge=2,
        description="Most tokens one batched model step runs: every session's decode row "
        "first, then chunks of waiting prefill (audio, frames, images, text).",
    )
    max_context_tokens: int = Field(
        32768,
        ge=256,
        description="KV memory reserved per session and stage (one slot per max_sessions); "
        "a conversation that fills it gets a context_length_exceeded error.",
    )
    context_budget_tokens: int | None = Field(
        None,
        ge=64,
        description="The thinker's context per session is kept within this many tokens (old "
        "video, then old audio, then old words are dropped, as session.truncation says); "
        "default: max_context_tokens minus reply_reserve_tokens.",
    )
    reply_reserve_tokens: int = Field(
        1024,
        ge=1,
        description="KV memory (and TMRoPE positions) kept free of the context budget for the "
        "reply being generated.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel for the batched thinker and talker: sdpa, eager, or "
        "flash_attention_2 (CUDA with the flash-attn package: rows packed without padding).",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA devices, run decode-only steps as CUDA graphs (one per bucket of "
        "batch size and key length); ignored on CPU.",
    )
    transcriber_model: str = Field(
        "auto",
        description="Whisper checkpoint that transcribes the caller (audio.input.transcription): "
        "auto (the tiny random one with a tiny model, else openai/whisper-small), tiny-whisper, "
        "a checkpoint directory, a hub id, or none (transcription off).",
    )
    transcriber_device: str | None = Field(
        None,
        description="Torch device of the transcriber process (e.g. cuda:1); default: the "
        "thinker's.",
    )
    transcription_queue_max: int = Field(
        32,
        ge=1,
        description="User audio items waiting for or in the transcriber, all sessions together; "
        "one more gets a transcription failed event naming this limit.",
    )

    # -- auth
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,  # never in a logged repr of the settings
        description="Accepted API keys (env: comma-separated). None: no auth, loopback only.",
    )
    client_secret_ttl_seconds: int = Field(
        600,
        ge=10,
        le=7200,
        description="Default lifetime of keys from /v1/realtime/client_secrets.",
    )
    client_secret_key: SecretStr | None = Field(
        None,
        min_length=32,
        description="Secret shared by every replica that seals client secrets (`ek_` keys), "
        "so any replica can check one another minted; 32+ characters (openssl rand -hex 32), "
        "by env or file. Unset: a random key per process (client secrets work on that replica "
        "only).",
    )

    # -- caps
    max_sessions: int = Field(
        16, ge=1, description="Concurrent realtime sessions; more are refused."
    )
    max_session_seconds: float = Field(
        1800.0, gt=0, description="A session is closed after this long."
    )
    session_expiry_warning_seconds: float = Field(
        60.0,
        ge=0,
        description="How long before max_session_seconds a session.expiring event warns the "
        "client (at most half the session; 0: no warning).",
    )
    max_message_bytes: int = Field(
        15 * 1024 * 1024,
        ge=1024,
        description="Largest client WebSocket message (OpenAI allows 15 MiB).",
    )
    max_buffered_audio_seconds: float = Field(
        120.0,
        gt=0,
        description="Most uncommitted user audio a session holds, and most audio one append or "
        "one input_audio part may carry; more is refused.",
    )
    max_input_text_chars: int = Field(
        32_768,
        ge=1,
        description="Longest input_text part of a user item, in characters (about 8k tokens "
        "of English); longer ones are refused.",
    )
    max_json_depth: int = Field(
        32, ge=4, le=1000, description="Deepest nesting of arrays/objects in a client event."
    )
    max_outbox_bytes: int = Field(
        16 * 1024 * 1024,
        ge=64 * 1024,
        description="Server events a session may hold for a client that is not reading; past "
        "this the session is closed (client_not_reading).",
    )
    max_client_lag_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest a server event may wait for a client that is not reading before "
        "the session is closed (client_not_reading).",
    )
    max_engine_calls: int = Field(
        1024,
        ge=16,
        description="Engine calls a session may have waiting (a stalled model); client events "
        "and media beyond it are refused.",
    )
    max_turn_input_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024 * 1024,
        description="Raw media (audio, frames, images) one pending user turn may hold; more is "
        "refused until the turn is answered or cleared.",
    )
    image_max_pixels: int = Field(
        1280 * 28 * 28,
        ge=28 * 28,
        description="Client images are scaled down (aspect kept) to at most this many pixels "
        "(Qwen's recommended max_pixels).",
    )
    decode_threads: int = Field(
        2,
        ge=1,
        description="Threads that parse large client events and decode images, off the event "
        "loop; calls beyond them wait their turn.",
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
    # 100: a hit's reply gets the 400 ms before the 500 ms stop to get going, more than the
    # server's first audio on the tiny CPU checkpoint (README, "Speculative replies")
    speculative_pause_ms: int = Field(
        100,
        ge=0,
        description="Silence within speech after which the reply starts, held until the turn "
        "ends (a hit: its audio is sent at once) or discarded unheard if the caller goes on; "
        "0: off. Only a pause shorter than the turn's silence window starts one.",
    )

    # -- WebRTC calls
    ice_servers: list[dict[str, str | list[str]]] = Field(
        default_factory=list,
        description="STUN/TURN servers for calls, as RTCIceServer objects (env: a JSON list); "
        "none by default: calls on one host or LAN need none, and no public server is contacted.",
    )
    turn_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="TURN server URLs (env: comma-separated) that get fresh time-limited "
        "credentials minted from `turn_secret`, e.g. turn:turn.example.com:3478?transport=udp.",
    )
    turn_secret: SecretStr | None = Field(
        None,
        description="Shared secret of the TURN server (coturn's static-auth-secret); give it by "
        "env or file, not by flag, so it stays out of the process list.",
    )
    turn_credential_ttl_seconds: int = Field(
        3600,
        ge=60,
        description="Lifetime of minted TURN credentials; at least "
        "max_session_seconds, since a call's relay is refreshed with the same credential.",
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
    call_connect_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A call not connected (ICE + DTLS) this long after its answer is hung up, "
        "whatever its offer holds.",
    )
    max_playout_seconds: float = Field(
        120.0,
        gt=0,
        description="Reply audio a call's outbound track may have queued; audio beyond it is "
        "dropped (an error event says so).",
    )

    # -- HTTP (checked before a request body is read)
    max_request_body_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest HTTP request body (SDP offers, client_secrets); more gets 413.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Largest HTTP request head (request line and headers); more gets 431.",
    )
    max_header_count: int = Field(
        100, ge=8, description="Most HTTP request headers; more gets 431."
    )
    http_header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection that has not sent a whole request head (an HTTP request or a "
        "WebSocket handshake) this long is closed with 408.",
    )
    http_body_timeout_seconds: float = Field(
        10.0, gt=0, description="A request body not received in full this long gets 408."
    )

    # -- operations
    metrics_host: str = Field(
        LOOPBACK_HOST,
        description="Address of the Prometheus /metrics listener, apart from the API port so "
        "proxies in front of the API never expose it (0.0.0.0 in containers, for the scraper).",
    )
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="TCP port of the /metrics listener (0: any free port)."
    )
    log_level: str = Field("INFO", description="Logging level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text for people, json for log pipelines (one object per line, "
        "with session_id and response_id).",
    )
    drain_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: how long open calls may go on (no new ones are "
        "taken) before they are ended with a server_shutting_down error.",
    )

    @field_validator("api_keys", "turn_urls", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        # env vars carry one string; a comma list is easier to write than JSON
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown logging level {value!r}")
        return value.upper()

    @field_validator("talker_device", "transcriber_device", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return value or None

    @model_validator(mode="after")
    def _check_budget(self) -> Settings:
        if self.reply_reserve_tokens >= self.max_context_tokens:
            raise ValueError(
                f"reply_reserve_tokens ({self.reply_reserve_tokens}) must be below "
                f"max_context_tokens ({self.max_context_tokens})"
            )
        room = self.max_context_tokens - self.reply_reserve_tokens
        if self.context_budget_tokens is not None and self.context_budget_tokens > room:
            raise ValueError(
                f"context_budget_tokens ({self.context_budget_tokens}) must leave the reply "
                f"its reserve: at most max_context_tokens - reply_reserve_tokens ({room})"
            )
        return self

    @model_validator(mode="after")
    def _check_turn(self) -> Settings:
        if bool(self.turn_urls) != (self.turn_secret is not None):
            raise ValueError("turn_urls and turn_secret go together: set both or neither")
        if self.turn_urls and self.turn_credential_ttl_seconds < self.max_session_seconds:
            raise ValueError(
                f"turn_credential_ttl_seconds ({self.turn_credential_ttl_seconds}) must be at "
                f"least max_session_seconds ({self.max_session_seconds:g}): a call's TURN relay "
                "is refreshed with the credential it started with"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def secrets(self) -> list[str]:
        """Every secret value set here, for the logs to redact."""
        sealed = [s.get_secret_value() for s in (self.turn_secret, self.client_secret_key) if s]
        return [*self.api_keys, *sealed]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags come first on their own (pydantic-settings puts the CLI source on top)
        return init_settings, env_settings, ConfigFileSource(settings_cls)


class ConfigFileSource(PydanticBaseSettingsSource):
    """The TOML file named by `config` in a source above it (a flag or OMNI_CONFIG)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if not path:
            return {}
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc
        # `config` itself has no meaning inside the file
        unknown = [k for k in values if k not in self.settings_cls.model_fields or k == "config"]
        if unknown:
            raise SettingsError(f"config file {path}: unknown settings {', '.join(unknown)}")
        return values


def settings_table() -> str:
    """The README's configuration table (a test keeps the README equal to this)."""
    rows = [
        "| setting (file key) | flag | environment | default | what it does |",
        "|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        shown = "" if default is None or default == [] else f"`{default}`"
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{flag}` | `{env}` | {shown} | {description} |")
    return "\n".join(rows)
