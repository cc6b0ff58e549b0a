"""Images from the wire (data URLs, base64 JPEG camera frames) to RGB arrays for the engine.

Pillow decodes JPEG/PNG/WebP; its decompression-bomb check is made an error so a tiny file
that claims gigapixels is refused instead of eating the server's memory.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from omni.session.audio_input import b64decode
from omni.session.errors import RealtimeError

_DATA_URL_PREFIX = "data:"


def decode_image(data: bytes, param: str) -> np.ndarray:
    """Encoded image bytes to uint8 HxWx3."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise RealtimeError(
            "invalid_image", f"{param} could not be decoded as an image: {exc}", param=param
        ) from None


def decode_image_url(url: object, param: str) -> np.ndarray:
    """An input_image `image_url`; only data: URLs, since the server fetches nothing."""
    if not isinstance(url, str) or not url.startswith(_DATA_URL_PREFIX):
        raise RealtimeError(
            "invalid_value",
            f"{param} must be a data: URL (data:image/jpeg;base64,...)",
            param=param,
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RealtimeError("invalid_value", f"{param} must be a base64 data: URL", param=param)
    return decode_image(b64decode(payload, param), param)
