"""Encoded images (JPEG, PNG, WebP) to upright RGB arrays, with PIL and numpy only.

Both the gateway (client images and camera frames arrive encoded) and the engine's vision
path decode images, and the gateway must not import transformers or torch to do it, so the
one decoder lives here. The pixel count is read from the header and checked before any pixel
is decompressed (a small file can claim a huge image); `max_pixels_out` scales the result
down, and JPEGs are decoded straight at a reduced scale when that suffices (PIL's draft mode),
so a large photo never costs its full-size buffer.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# decoded images above this are refused before their pixels are decompressed
MAX_DECODED_PIXELS = 40_000_000
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP")


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most `max_pixels` (never up)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 HxWx3; transparency composited on white, as transformers' convert_to_rgb does."""
    if image.mode == "RGB":
        return np.array(image)
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255))
        white.alpha_composite(image.convert("RGBA"))
        image = white
    return np.array(image.convert("RGB"))


def decode_image(
    data: bytes, max_pixels: int = MAX_DECODED_PIXELS, max_pixels_out: int | None = None
) -> np.ndarray:
    """JPEG, PNG or WebP bytes to uint8 HxWx3 RGB, upright (EXIF orientation applied).

    Raises ValueError for data that is not such an image or claims more than `max_pixels`.
    With `max_pixels_out`, the result is scaled down (bicubic) to fit it.
    """
    try:
        with Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"image is {width}x{height}, above {max_pixels} pixels")
            if max_pixels_out is not None:
                # JPEG only: decode at 1/2, 1/4 or 1/8 scale, still at least the target size
                img.draft("RGB", fit_size(width, height, max_pixels_out))
            upright = ImageOps.exif_transpose(img)
            if max_pixels_out is not None:
                size = fit_size(*upright.size, max_pixels_out)
                if size != upright.size:
                    upright = upright.resize(size, Image.Resampling.BICUBIC)
            return to_rgb(upright)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"cannot decode image: {e}") from e
