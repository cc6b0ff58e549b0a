"""Images from the wire (data URLs, base64 JPEG camera frames) to RGB arrays for the engine.

Decoding is `omni.media.images` (shared with the engine, no transformers import): the pixel
count checked from the header before decoding, EXIF orientation applied, transparency on
white, and the result scaled down to `image_max_pixels`, so a session never keeps a
full-size photo. This module only names the field at fault. It runs off the event loop
(`omni.session.offload`).
"""

from __future__ import annotations

import numpy as np

from omni.media import images
from omni.session.errors import RealtimeError
from omni.session.wire_audio import b64decode

_DATA_URL_PREFIX = "data:"


def decode_base64_image(text: object, param: str, max_pixels: int) -> np.ndarray:
    """Base64 image bytes (Qwen-Omni-Realtime's camera frames) to uint8 HxWx3."""
    try:
        return images.decode_image(b64decode(text, param), max_pixels_out=max_pixels)
    except ValueError as exc:
        raise RealtimeError("invalid_image", f"{param}: {exc}", param=param) from None


def decode_image_url(url: object, param: str, max_pixels: int) -> np.ndarray:
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
    return decode_base64_image(payload, param, max_pixels)
