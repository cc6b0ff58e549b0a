"""Images from the wire (data URLs, base64 JPEG camera frames) to RGB arrays for the engine.

Decoding is the engine's own (`omni.engine.vision.decode_image`: the pixel count checked from
the header before decoding, EXIF orientation applied, transparency on white), so the session
and the engine agree on what an image is; this module only names the field at fault.
"""

from __future__ import annotations

import numpy as np

from omni.engine import vision
from omni.session.audio_input import b64decode
from omni.session.errors import RealtimeError

_DATA_URL_PREFIX = "data:"


def decode_image(data: bytes, param: str) -> np.ndarray:
    """Encoded image bytes to uint8 HxWx3."""
    try:
        return vision.decode_image(data)
    except ValueError as exc:
        raise RealtimeError("invalid_image", f"{param}: {exc}", param=param) from None


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
