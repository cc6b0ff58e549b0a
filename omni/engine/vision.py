"""Images and live camera frames in, patch rows for the thinker's Qwen2-VL ViT out.

Images go through transformers' own PIL image processor (`Qwen2VLImageProcessorPil`), so they
equal what the Qwen2.5-Omni processor gives. Video cannot: transformers' `Qwen2VLVideoProcessor`
needs torchvision, and it wants the whole clip, while a call delivers frames one at a time.
`VideoPatcher` therefore rebuilds the video path per temporal step: the same target size
(smart_resize with the Omni processor's video pixel bounds), the same rescale and CLIP
normalisation (the image processor's own functions), and `patchify`'s row layout. The one
knowing difference: frames are resized with PIL bicubic, where the video processor uses
torchvision's bicubic; pixel values differ slightly, shapes and layout do not.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.image_transforms import resize
from transformers.image_utils import ChannelDimension
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

# decoding is shared with the gateway, which must not import transformers
from omni.media.images import MAX_DECODED_PIXELS, decode_image

# Qwen2.5-Omni processor's videos_kwargs: 128..768 merged tokens' worth of pixels per frame
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# longest side of a camera frame before smart_resize: a 448x448 pair is 256 thinker tokens
DEFAULT_FRAME_MAX_SIDE = 448

_IMAGE_KWARGS = frozenset(
    Qwen2VLImageProcessorPil.valid_kwargs.__optional_keys__
    | Qwen2VLImageProcessorPil.valid_kwargs.__required_keys__
)


def image_processor(processor_config: Mapping[str, Any] | None = None) -> Qwen2VLImageProcessorPil:
    """transformers' PIL image processor for a checkpoint's preprocessor_config (cached).

    Keys the image processor does not know (the audio extractor's, for instance) are ignored,
    so a whole preprocessor_config.json can be passed.
    """
    kwargs = {k: v for k, v in (processor_config or {}).items() if k in _IMAGE_KWARGS}
    return _cached_processor(json.dumps(kwargs, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _cached_processor(kwargs_json: str) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(**json.loads(kwargs_json))


def image_to_patches(
    rgb: np.ndarray, processor_config: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One still image (uint8 HxWx3) as (pixel_values (n_patches, C*T*p*p), grid_thw)."""
    _check_rgb(rgb)
    out = image_processor(processor_config)(images=rgb, return_tensors="np")
    t, h, w = (int(v) for v in out["image_grid_thw"][0])
    return out["pixel_values"], (t, h, w)


@dataclass(frozen=True)
class VideoStep:
    """One temporal grid step: `temporal_patch_size` frames as patch rows.

    Concatenating the steps of one call gives the pixel_values_videos of a video with grid
    (number of steps, gh, gw).
    """

    pixel_values: np.ndarray  # (gh * gw, C * temporal_patch_size * patch_size**2), float32
    grid_thw: tuple[int, int, int]  # (1, gh, gw)
    num_tokens: int  # thinker tokens after spatial merging: gh * gw / merge_size**2


class VideoPatcher:
    """Live camera frames (uint8 HxWx3, one at a time) to temporal steps of ViT patches.

    The first frame fixes the size for the whole call: its longest side is capped at
    `max_side`, then smart_resize (multiples of patch_size * merge_size, within the Omni video
    pixel bounds) picks the target; later frames are resized straight to that target, whatever
    their own size. The cap is folded into that single resize, so a frame is resampled once.
    """

    def __init__(
        self,
        max_side: int | None = DEFAULT_FRAME_MAX_SIDE,
        processor_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._proc = image_processor(processor_config)
        self.max_side = max_side
        self.patch_size: int = self._proc.patch_size
        self.merge_size: int = self._proc.merge_size
        self.temporal_patch_size: int = self._proc.temporal_patch_size
        self.frame_size: tuple[int, int] | None = None  # (height, width) after resizing
        self._pending: list[np.ndarray] = []  # normalised CHW frames of the current step

    def push(self, rgb: np.ndarray) -> VideoStep | None:
        """Add a frame; returns a step once `temporal_patch_size` frames are in."""
        self._pending.append(self._prepare(rgb))
        if len(self._pending) < self.temporal_patch_size:
            return None
        return self._step()

    def flush(self) -> VideoStep | None:
        """Close a partial step by repeating its last frame, as the video processor does."""
        if not self._pending:
            return None
        while len(self._pending) < self.temporal_patch_size:
            self._pending.append(self._pending[-1])
        return self._step()

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a first frame of this size is resized to."""
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=VIDEO_MIN_PIXELS,
            max_pixels=VIDEO_MAX_PIXELS,
        )

    def _prepare(self, rgb: np.ndarray) -> np.ndarray:
        _check_rgb(rgb)
        if self.frame_size is None:
            self.frame_size = self.target_size(*rgb.shape[:2])
        chw = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
        if chw.shape[1:] != self.frame_size:
            chw = resize(
                chw,
                self.frame_size,
                resample=self._proc.resample,
                data_format=ChannelDimension.FIRST,
                input_data_format=ChannelDimension.FIRST,
            )
        # the image processor's own rescale and normalise, so values match the image path
        image = self._proc.rescale(chw, self._proc.rescale_factor)
        return self._proc.normalize(image, self._proc.image_mean, self._proc.image_std)

    def _step(self) -> VideoStep:
        frames = np.stack(self._pending)  # (T, C, H, W)
        self._pending = []
        t, c, height, width = frames.shape
        p, m = self.patch_size, self.merge_size
        gh, gw = height // p, width // p
        # Qwen2VLVideoProcessor.patchify's order: (gh/m, gw/m, m, m, C, T, p, p) per step
        patches = frames.reshape(t, c, gh // m, m, p, gw // m, m, p)
        patches = patches.transpose(2, 5, 3, 6, 1, 0, 4, 7)
        rows = patches.reshape(gh * gw, c * t * p * p).astype(np.float32)
        return VideoStep(pixel_values=rows, grid_thw=(1, gh, gw), num_tokens=gh * gw // (m * m))


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {rgb.dtype} {rgb.shape}")


def decode_image_base64(text: str, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """A data URL (`data:image/jpeg;base64,...`, OpenAI's input_image) or bare base64
    (Qwen-Omni-Realtime's input_image_buffer.append) to uint8 HxWx3 RGB."""
    text = text.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise ValueError(f"not a base64 image data URL: {header[:64]!r}")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"invalid base64 image data: {e}") from e
    return decode_image(data, max_pixels)
