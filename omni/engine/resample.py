"""Streaming sample-rate conversion and G.711 (µ-law, A-law) codecs for the audio edges.

soxr: high quality, keeps filter state across pieces (so 20 ms frames join without clicks),
and is what pipecat uses. G.711 is done with numpy because `audioop` left Python in 3.13.
"""

from __future__ import annotations

import numpy as np
import soxr

_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.int16): "int16"}


class StreamResampler:
    """Resamples one mono stream delivered in pieces; dtype (float32 or int16) is kept.

    soxr holds back filter delay plus block buffering (at "HQ" with 20 ms pieces: about 22 ms
    on average, 37 ms at most, for 48k->16k and 24k->48k; about 62 ms on average from 8 kHz);
    "LQ" halves that, "QQ" has none but is poor. `process(..., last=True)` flushes the stream,
    after which the total output is `in_len * out_rate / in_rate`.
    """

    def __init__(
        self, in_rate: int, out_rate: int, dtype: type = np.float32, quality: str = "HQ"
    ) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be float32 or int16, got {self.dtype}")
        self._stream: soxr.ResampleStream | None = None
        if in_rate != out_rate:
            self._stream = soxr.ResampleStream(
                in_rate, out_rate, 1, dtype=_DTYPES[self.dtype], quality=quality
            )

    def process(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        pcm = np.ascontiguousarray(pcm, dtype=self.dtype).reshape(-1)
        if self._stream is None:
            return pcm
        return self._stream.resample_chunk(pcm, last=last)


# G.711 segment (exponent) arithmetic on 16-bit linear samples.
_ULAW_BIAS = 0x84
_ULAW_CLIP = 32635


def _ulaw_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF  # bytes are stored inverted
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55  # even bits are stored inverted
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    # A-law's sign bit is set for positive samples
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


ULAW_TO_PCM16 = _ulaw_table()
ALAW_TO_PCM16 = _alaw_table()


def ulaw_decode(data: bytes) -> np.ndarray:
    return ULAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]


def alaw_decode(data: bytes) -> np.ndarray:
    return ALAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]


def _highest_bit(x: np.ndarray) -> np.ndarray:
    """floor(log2(x)) for positive ints below 2**16."""
    return np.frexp(x.astype(np.float64))[1] - 1


def ulaw_encode(pcm: np.ndarray) -> bytes:
    x = np.asarray(pcm, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    # negative samples are coded by magnitude - 1 (one's complement, as ITU-T G.191 does)
    magnitude = np.minimum(np.where(x < 0, ~x, x), _ULAW_CLIP) + _ULAW_BIAS  # 132..32767
    exponent = _highest_bit(magnitude) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def alaw_encode(pcm: np.ndarray) -> bytes:
    x = np.asarray(pcm, dtype=np.int32)
    # one's complement for negatives, as for µ-law; then 13-bit linear, 0..4095
    magnitude = np.where(x < 0, ~x, x) >> 3
    exponent = np.clip(_highest_bit(np.maximum(magnitude, 1)) - 4, 0, 7)
    mantissa = (magnitude >> np.maximum(exponent, 1)) & 0x0F
    mask = np.where(x < 0, 0x55, 0xD5)
    return (((exponent << 4) | mantissa) ^ mask).astype(np.uint8).tobytes()
