"""Wire audio formats and their decoding to the engine's input (float32, 16 kHz).

OpenAI clients send pcm16 at 24 kHz (or G.711 at 8 kHz); Qwen-Omni-Realtime clients send
pcm16 at 16 kHz. Each session keeps one streaming decoder so resampling carries its filter
state across appends instead of clicking at every chunk boundary. Resampling (soxr) and
G.711 come from the engine's `resample` module, so the project has one of each.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from omni.engine.api import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from omni.engine.resample import StreamResampler, alaw_decode, ulaw_decode
from omni.session.errors import RealtimeError, quoted

Encoding = Literal["pcm16", "pcmu", "pcma"]
PCM_RATES = (16_000, 24_000)
G711_RATE = 8_000
_G711 = {"pcmu": ulaw_decode, "pcma": alaw_decode}


@dataclass(frozen=True)
class AudioFormat:
    encoding: Encoding
    rate: int
    # the beta-shape name the client used ("pcm16", "pcm", ...), echoed back in its session
    beta_name: str | None = None

    def to_ga(self) -> dict[str, Any]:
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": f"audio/{self.encoding}"}

    def seconds(self, n_bytes: int) -> float:
        """How long `n_bytes` of this format play: caps are checked before decoding."""
        bytes_per_sample = 2 if self.encoding == "pcm16" else 1
        return n_bytes / (bytes_per_sample * self.rate)

    def to_beta(self) -> str:
        if self.beta_name:
            return self.beta_name
        return {"pcm16": "pcm16", "pcmu": "g711_ulaw", "pcma": "g711_alaw"}[self.encoding]


PCM24K = AudioFormat("pcm16", OUTPUT_SAMPLE_RATE)
PCM16K = AudioFormat("pcm16", INPUT_SAMPLE_RATE)


def parse_ga_format(spec: dict[str, Any], param: str) -> AudioFormat:
    """GA `{type: "audio/pcm", rate}`; 16 kHz is our extension for Qwen-style clients."""
    kind = spec.get("type", "audio/pcm")
    if kind == "audio/pcm":
        rate = spec.get("rate", OUTPUT_SAMPLE_RATE)
        if rate not in PCM_RATES:
            raise RealtimeError(
                "invalid_value",
                f"audio/pcm rate must be 16000 or 24000, got {quoted(rate)}",
                param=f"{param}.rate",
            )
        return AudioFormat("pcm16", rate)
    if kind in ("audio/pcmu", "audio/pcma"):
        return AudioFormat(kind.removeprefix("audio/"), G711_RATE)  # type: ignore[arg-type]
    raise RealtimeError(
        "invalid_value",
        f"unknown audio format {quoted(kind)} (audio/pcm, audio/pcmu, audio/pcma)",
        param=f"{param}.type",
    )


def parse_beta_format(name: str, param: str, *, qwen_input: bool = False) -> AudioFormat:
    """Beta names. "pcm16" is 24 kHz for OpenAI; Qwen-Omni-Realtime takes 16 kHz in (its old
    name "pcm16", its new "pcm") and gives 24 kHz out ("pcm24", or "pcm" again)."""
    if name in ("pcm16", "pcm"):
        return AudioFormat("pcm16", INPUT_SAMPLE_RATE if qwen_input else OUTPUT_SAMPLE_RATE, name)
    if name == "pcm24":
        return AudioFormat("pcm16", OUTPUT_SAMPLE_RATE, name)
    if name in ("g711_ulaw", "g711_alaw"):
        return AudioFormat("pcmu" if name == "g711_ulaw" else "pcma", G711_RATE, name)
    raise RealtimeError(
        "invalid_value",
        f"unknown audio format {quoted(name)} (pcm16, g711_ulaw, g711_alaw)",
        param=param,
    )


def b64decode(data: object, param: str) -> bytes:
    if not isinstance(data, str):
        raise RealtimeError("invalid_value", f"{param} must be a base64 string", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RealtimeError(
            "invalid_base64", f"{param} is not valid base64: {exc}", param=param
        ) from None


def b64encode_pcm16(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2", copy=False).tobytes()).decode("ascii")


class AudioDecoder:
    """Streaming: wire bytes in, float32 16 kHz out, resampler state kept between calls."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._resampler = StreamResampler(fmt.rate, INPUT_SAMPLE_RATE)

    def decode(self, data: bytes, param: str = "audio") -> np.ndarray:
        if not data:
            raise RealtimeError("invalid_audio", f"{param} is empty", param=param)
        g711 = _G711.get(self.format.encoding)
        if g711 is not None:
            pcm = g711(data)
        elif len(data) % 2:
            raise RealtimeError(
                "invalid_audio",
                f"{param}: pcm16 audio must be whole 16-bit samples, got an odd {len(data)} bytes",
                param=param,
            )
        else:
            pcm = np.frombuffer(data, dtype="<i2")
        return self._resampler.process(pcm.astype(np.float32) / 32768.0)

    def flush(self) -> np.ndarray:
        """The resampler's tail at the end of a stretch of audio; the decoder starts afresh."""
        tail = self._resampler.process(np.zeros(0, np.float32), last=True)
        self._resampler = StreamResampler(self.format.rate, INPUT_SAMPLE_RATE)
        return tail


def decode_clip(data: bytes, fmt: AudioFormat, param: str) -> np.ndarray:
    """A whole clip (an input_audio content part) to float32 16 kHz."""
    decoder = AudioDecoder(fmt)
    pcm = decoder.decode(data, param)
    return np.concatenate([pcm, decoder.flush()])
