"""A session's configuration: updated from either wire shape, rendered back in either shape.

`SessionConfig` is immutable; `updated()` validates a whole `session.update` and returns a
new config or raises, so a rejected update changes nothing (OpenAI's rule). The same parser
handles the session attached to an ephemeral client secret.

Every field of the protocol is accepted; only a value outside it is refused, naming the
field. What the service cannot do is refused when it would change what the caller hears
(output formats other than pcm16 24 kHz, unknown voices); what is advisory is accepted,
kept and echoed (noise reduction, tracing, prompt, include, speed, idle timeout);
the transcription settings are honoured (omni/session/input_transcription.py). semantic_vad is
honoured by a prosodic end-of-turn score and an eagerness-bounded wait
(omni/session/end_of_turn.py, omni/session/turn_detection.py). Tools are accepted and echoed
as none: the model never calls one. OpenAI's built-in voice names speak in this model's
default voice; the voices are the served checkpoint family's (omni/checkpoints/family.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from omni.checkpoints.family import QWEN2_5_OMNI
from omni.engine.api import OUTPUT_SAMPLE_RATE, Truncation
from omni.session.client_events import (
    BETA_SESSION_FIELDS,
    GA_SESSION_FIELDS,
    AudioFormatIn,
    Include,
    Modality,
    NoiseReductionIn,
    RetentionRatioIn,
    SessionIn,
    TracingIn,
    TurnDetectionIn,
)
from omni.session.errors import RealtimeError, quoted
from omni.session.input_transcription import InputTranscription, input_transcription
from omni.session.turn_detection import Eagerness, max_wait_ms
from omni.session.wire_audio import PCM24K, AudioFormat, parse_beta_format, parse_ga_format
from omni.settings import Settings

Shape = Literal["ga", "beta"]
NoiseReduction = Literal["near_field", "far_field"]
# the GA protocol's built-in voices: clients send one by default (LiveKit "marin")
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)


def session_shape(fields: SessionIn) -> Shape | None:
    """Which shape a session object is written in; None when it could be either."""
    sent = fields.model_fields_set
    if sent & GA_SESSION_FIELDS:
        return "ga"
    if sent & BETA_SESSION_FIELDS:
        return "beta"
    return None


def normalize_voice(voice: str, param: str, voices: tuple[str, ...]) -> str:
    """The model's voice `voice` names (any case; an OpenAI voice: the model's default, the
    first of `voices`)."""
    for name in voices:
        if voice.lower() == name.lower():
            return name
    if voice.lower() in OPENAI_VOICES:
        return voices[0]
    raise RealtimeError(
        "invalid_value",
        f"unknown voice {quoted(voice)}; this model speaks as {', '.join(voices)}",
        param=param,
    )


def output_modalities(requested: list[Modality]) -> tuple[Modality, ...]:
    # audio always comes with its transcript, so ["text", "audio"] (beta) means audio
    return ("audio",) if "audio" in requested else ("text",)


def check_output_format(fmt: AudioFormat, param: str) -> None:
    if fmt.encoding != "pcm16" or fmt.rate != OUTPUT_SAMPLE_RATE:
        raise RealtimeError("unsupported", "output audio is pcm16 at 24 kHz only", param=param)


def max_tokens(value: int | str | None) -> int | None:
    return value if isinstance(value, int) else None


def truncation(value: str | RetentionRatioIn) -> Truncation:
    if isinstance(value, RetentionRatioIn):
        return Truncation("retention_ratio", value.retention_ratio)
    return Truncation(value)  # type: ignore[arg-type]


def noise_reduction(value: NoiseReductionIn | None) -> NoiseReduction | None:
    return value.type if value is not None else None


def truncation_wire(t: Truncation) -> str | dict[str, Any]:
    if t.mode == "retention_ratio":
        return {"type": "retention_ratio", "retention_ratio": t.retention_ratio}
    return t.mode


@dataclass(frozen=True)
class TurnDetection:
    """Turn detection with OpenAI's names and meanings. Silero VAD runs with `threshold` and
    `silence_duration_ms` in both modes; for semantic_vad the silence window is the
    eagerness's longest wait, the prosodic end-of-turn policy (turn_detection.py) usually ends
    the turn sooner, and the server_vad numbers are not on the wire."""

    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    create_response: bool = True
    interrupt_response: bool = True
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    eagerness: Eagerness = "auto"
    idle_timeout_ms: int | None = None  # accepted and kept; no response is triggered by it

    def merged(self, update: TurnDetectionIn, defaults: TurnDetection) -> TurnDetection:
        """Fields not given keep their values; a change of type starts from the defaults."""
        given = {
            k: v
            for k, v in update.model_dump(exclude_unset=True, exclude_none=True).items()
            if k in self.__dataclass_fields__
        }
        base = self if given.get("type", self.type) == self.type else defaults
        merged = replace(base, **given)
        if merged.type == "semantic_vad":
            return replace(merged, silence_duration_ms=max_wait_ms(merged.eagerness))
        return merged

    def to_wire(self, shape: Shape) -> dict[str, Any]:
        common = {
            "type": self.type,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }
        if self.type == "semantic_vad":
            return {**common, "eagerness": self.eagerness}
        wire: dict[str, Any] = {
            **common,
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
        }
        if shape == "ga":
            wire["idle_timeout_ms"] = self.idle_timeout_ms
        return wire


@dataclass(frozen=True)
class Advisory:
    """Accepted fields that change nothing the caller hears, kept to be echoed back."""

    noise_reduction: NoiseReduction | None = None
    speed: float = 1.0
    tool_choice: str | dict[str, Any] = "auto"
    tracing: str | dict[str, Any] | None = None
    include: tuple[Include, ...] | None = None
    prompt: dict[str, Any] | None = None


@dataclass(frozen=True)
class SessionConfig:
    model: str
    vad_defaults: TurnDetection  # what enabling server_vad without parameters gives
    instructions: str | None = None
    voices: tuple[str, ...] = QWEN2_5_OMNI.voices  # the served model's; the first is the default
    voice: str = QWEN2_5_OMNI.voices[0]
    modalities: tuple[Modality, ...] = ("audio",)
    input_format: AudioFormat = PCM24K
    output_format: AudioFormat = PCM24K
    turn_detection: TurnDetection | None = None
    max_output_tokens: int | None = None
    seed: int | None = None
    truncation: Truncation = Truncation()  # how the context keeps to its budget
    transcription: InputTranscription | None = None  # the caller's words as text (None: off)
    advisory: Advisory = Advisory()
    qwen: bool = False  # Qwen-Omni-Realtime dialect: beta "pcm16" input means 16 kHz

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        model: str | None = None,
        voices: tuple[str, ...] = QWEN2_5_OMNI.voices,
    ) -> SessionConfig:
        """A new session's config: server_vad on with the configured defaults (OpenAI's
        default), speaking in the first of the served model's `voices`."""
        vad = TurnDetection(
            settings.vad_threshold, settings.vad_prefix_padding_ms, settings.vad_silence_duration_ms
        )
        return cls(
            model=model or settings.served_model_name,
            vad_defaults=vad,
            turn_detection=vad,
            voices=voices,
            voice=voices[0],
        )

    @property
    def audio_out(self) -> bool:
        return "audio" in self.modalities

    def updated(self, s: SessionIn, param: str = "session") -> SessionConfig:
        sent = s.model_fields_set
        new: dict[str, Any] = {}
        advisory = self._advisory(s)
        if s.model:
            new["model"] = s.model
        if "instructions" in sent:
            new["instructions"] = s.instructions
        for field in ("output_modalities", "modalities"):
            value = getattr(s, field)
            if value:
                new["modalities"] = output_modalities(value)
        for field in ("max_output_tokens", "max_response_output_tokens", "max_tokens"):
            if field in sent:
                new["max_output_tokens"] = max_tokens(getattr(s, field))
        if s.seed is not None:
            new["seed"] = s.seed
        if s.truncation is not None:
            new["truncation"] = truncation(s.truncation)
        if s.voice:
            new["voice"] = normalize_voice(s.voice, f"{param}.voice", self.voices)

        # beta / Qwen flat audio fields
        qwen = (
            self.qwen or s.input_audio_format == "pcm" or s.output_audio_format in ("pcm", "pcm24")
        )
        new["qwen"] = qwen
        if s.input_audio_format:
            new["input_format"] = parse_beta_format(
                s.input_audio_format, f"{param}.input_audio_format", qwen_input=qwen
            )
        if s.output_audio_format:
            fmt = parse_beta_format(s.output_audio_format, f"{param}.output_audio_format")
            check_output_format(fmt, f"{param}.output_audio_format")
            new["output_format"] = fmt
        if "turn_detection" in sent:
            new["turn_detection"] = self._turn_detection(s.turn_detection)
        if "input_audio_transcription" in sent:
            new["transcription"] = input_transcription(
                s.input_audio_transcription, f"{param}.input_audio_transcription"
            )
        if "input_audio_noise_reduction" in sent:
            advisory["noise_reduction"] = noise_reduction(s.input_audio_noise_reduction)
        if s.speed is not None:
            advisory["speed"] = s.speed

        # GA nested audio config
        audio_in = s.audio.input if s.audio else None
        audio_out = s.audio.output if s.audio else None
        if audio_in is not None:
            if audio_in.format is not None:
                new["input_format"] = self._ga_format(
                    audio_in.format, f"{param}.audio.input.format"
                )
            if "turn_detection" in audio_in.model_fields_set:
                new["turn_detection"] = self._turn_detection(audio_in.turn_detection)
            if "transcription" in audio_in.model_fields_set:
                new["transcription"] = input_transcription(
                    audio_in.transcription, f"{param}.audio.input.transcription"
                )
            if "noise_reduction" in audio_in.model_fields_set:
                advisory["noise_reduction"] = noise_reduction(audio_in.noise_reduction)
        if audio_out is not None:
            if audio_out.format is not None:
                fmt = self._ga_format(audio_out.format, f"{param}.audio.output.format")
                check_output_format(fmt, f"{param}.audio.output.format")
                new["output_format"] = fmt
            if audio_out.voice:
                new["voice"] = normalize_voice(
                    audio_out.voice, f"{param}.audio.output.voice", self.voices
                )
            if audio_out.speed is not None:
                advisory["speed"] = audio_out.speed
        return replace(self, **new, advisory=replace(self.advisory, **advisory))

    def _advisory(self, s: SessionIn) -> dict[str, Any]:
        """The top-level advisory fields this update sets (null means off, as sent)."""
        sent = s.model_fields_set
        out: dict[str, Any] = {}
        if s.tool_choice is not None:
            choice = s.tool_choice
            out["tool_choice"] = (
                choice if isinstance(choice, str) else choice.model_dump(exclude_none=True)
            )
        if "tracing" in sent:
            tracing = s.tracing
            out["tracing"] = (
                tracing.model_dump(exclude_none=True) if isinstance(tracing, TracingIn) else tracing
            )
        if "include" in sent:
            out["include"] = tuple(s.include) if s.include is not None else None
        if "prompt" in sent:
            out["prompt"] = s.prompt.model_dump(exclude_none=True) if s.prompt else None
        return out

    def _turn_detection(self, update: TurnDetectionIn | None) -> TurnDetection | None:
        if update is None:
            return None
        current = self.turn_detection or self.vad_defaults
        return current.merged(update, self.vad_defaults)

    @staticmethod
    def _ga_format(spec: AudioFormatIn, param: str) -> AudioFormat:
        return parse_ga_format(spec.model_dump(exclude_none=True), param)

    def to_wire(self, shape: Shape, session_id: str, expires_at: int) -> dict[str, Any]:
        turn_detection = self.turn_detection.to_wire(shape) if self.turn_detection else None
        max_out: int | str = self.max_output_tokens or "inf"
        transcription = self.transcription.to_wire() if self.transcription else None
        common = {
            "id": session_id,
            "object": "realtime.session",
            "model": self.model,
            "expires_at": expires_at,
            "instructions": self.instructions or "",
            "tools": [],  # accepted, never called: this model has no function calling here
            "tool_choice": self.advisory.tool_choice,
            "tracing": self.advisory.tracing,
        }
        transcription = self.transcription.to_wire() if self.transcription else None
        noise = {"type": self.advisory.noise_reduction} if self.advisory.noise_reduction else None
        if shape == "beta":
            return {
                **common,
                "modalities": ["text", "audio"] if self.audio_out else ["text"],
                "voice": self.voice,
                "input_audio_format": self.input_format.to_beta(),
                "output_audio_format": self.output_format.to_beta(),
                "input_audio_transcription": transcription,
                "input_audio_noise_reduction": noise,
                "turn_detection": turn_detection,
                "speed": self.advisory.speed,
                "max_response_output_tokens": max_out,
            }
        return {
            "type": "realtime",
            **common,
            "output_modalities": list(self.modalities),
            "audio": {
                "input": {
                    "format": self.input_format.to_ga(),
                    "transcription": transcription,
                    "noise_reduction": noise,
                    "turn_detection": turn_detection,
                },
                "output": {
                    "format": self.output_format.to_ga(),
                    "voice": self.voice,
                    "speed": self.advisory.speed,
                },
            },
            "max_output_tokens": max_out,
            "truncation": truncation_wire(self.truncation),
            "prompt": self.advisory.prompt,
            "include": list(self.advisory.include) if self.advisory.include is not None else None,
        }
