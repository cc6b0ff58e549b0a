"""Image and camera-frame patches against transformers' Qwen2-VL PIL image processor."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from omni.engine.vision import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VideoPatcher,
    decode_image,
    decode_image_base64,
    image_to_patches,
)

PATCH_DIM = 3 * 2 * 14 * 14


def frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: resampling has something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def video_image_processor() -> Qwen2VLImageProcessorPil:
    """The image processor with the Omni processor's video pixel bounds."""
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}
    )


def test_image_patches_equal_the_image_processor() -> None:
    img = frame(300, 401)
    pixels, grid = image_to_patches(img)
    ref = Qwen2VLImageProcessorPil()(images=img, return_tensors="np")
    np.testing.assert_array_equal(pixels, ref["pixel_values"])
    assert grid == tuple(ref["image_grid_thw"][0]) == (1, 22, 28)


def test_image_patches_follow_a_whole_preprocessor_config() -> None:
    img = frame(1000, 1500)
    # audio keys of a real preprocessor_config.json are ignored
    config = {"min_pixels": 3136, "max_pixels": 200_000, "feature_size": 128, "n_fft": 400}
    pixels, grid = image_to_patches(img, config)
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=200_000)(
        images=img, return_tensors="np"
    )
    np.testing.assert_array_equal(pixels, ref["pixel_values"])
    assert grid == tuple(ref["image_grid_thw"][0])
    assert grid[1] * grid[2] * 14 * 14 <= 200_000


@pytest.mark.parametrize("size", [(336, 448), (375, 500)], ids=["aligned", "resized"])
def test_identical_frames_equal_the_image_path(size: tuple[int, int]) -> None:
    # an image is a video of one frame repeated temporal_patch_size times
    img = frame(*size)
    patcher = VideoPatcher(max_side=None)
    assert patcher.push(img) is None
    step = patcher.push(img)
    ref = video_image_processor()(images=img, return_tensors="np")
    assert step is not None
    np.testing.assert_allclose(step.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
    assert step.grid_thw == tuple(ref["image_grid_thw"][0])
    assert step.pixel_values.dtype == np.float32


def test_two_frames_interleave_in_patchify_order() -> None:
    # within a row the layout is (C, T, p, p): frame 0 then frame 1 for each channel
    a, b = frame(336, 448, seed=1), frame(336, 448, seed=2)
    patcher = VideoPatcher()
    patcher.push(a)
    step = patcher.push(b)
    assert step is not None
    proc = video_image_processor()
    ref_a = proc(images=a, return_tensors="np")["pixel_values"].reshape(-1, 3, 2, 196)
    ref_b = proc(images=b, return_tensors="np")["pixel_values"].reshape(-1, 3, 2, 196)
    rows = step.pixel_values.reshape(-1, 3, 2, 196)
    np.testing.assert_allclose(rows[:, :, 0], ref_a[:, :, 0], atol=1e-6)
    np.testing.assert_allclose(rows[:, :, 1], ref_b[:, :, 0], atol=1e-6)


def test_flush_repeats_the_last_frame() -> None:
    img = frame(336, 448)
    patcher = VideoPatcher()
    assert patcher.flush() is None
    patcher.push(img)
    step = patcher.flush()
    assert step is not None
    ref = video_image_processor()(images=img, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(step.pixel_values, ref, atol=1e-6)
    assert patcher.flush() is None


@pytest.mark.parametrize(
    "size,max_side,grid,tokens",
    [
        ((448, 448), 448, (1, 32, 32), 256),  # DESIGN.md's budget: 256 tokens per 448x448 pair
        ((480, 640), 448, (1, 24, 32), 192),  # capped to 336x448
        ((720, 1280), 448, (1, 18, 32), 144),  # capped to 252x448, smart_resize -> 252x448
        ((120, 160), 448, (1, 20, 28), 140),  # below min_pixels: grown to 280x392
        ((1080, 1920), None, (1, 40, 72), 720),  # no cap: shrunk to max_pixels, 560x1008
    ],
)
def test_grid_follows_the_cap_and_smart_resize(
    size: tuple[int, int], max_side: int | None, grid: tuple[int, int, int], tokens: int
) -> None:
    patcher = VideoPatcher(max_side=max_side)
    patcher.push(frame(*size))
    step = patcher.push(frame(*size, seed=3))
    assert step is not None
    assert step.grid_thw == grid
    assert step.num_tokens == tokens
    assert step.pixel_values.shape == (grid[1] * grid[2], PATCH_DIM)
    h, w = patcher.frame_size or (0, 0)
    assert h % 28 == 0 and w % 28 == 0
    assert VIDEO_MIN_PIXELS <= h * w <= VIDEO_MAX_PIXELS


def test_later_frames_take_the_first_frames_size() -> None:
    patcher = VideoPatcher()
    patcher.push(frame(480, 640))
    step = patcher.push(frame(720, 1280))
    assert step is not None and step.grid_thw == (1, 24, 32)
    patcher.push(frame(100, 100))
    assert patcher.flush().grid_thw == (1, 24, 32)  # type: ignore[union-attr]


def test_frames_must_be_uint8_rgb() -> None:
    with pytest.raises(ValueError):
        VideoPatcher().push(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError):
        image_to_patches(np.zeros((10, 10, 3), np.float32))


# --- decoding -----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_decode_png_is_lossless_and_jpeg_decodes() -> None:
    rgb = frame(40, 60)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgb), "PNG")), rgb)
    jpeg = encode(Image.fromarray(rgb), "JPEG")
    decoded = decode_image(jpeg)
    assert decoded.shape == (40, 60, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def test_decode_composites_transparency_on_white_and_greyscale_to_rgb() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"))[0, 0].tolist() == [255, 255, 255]
    grey = Image.new("L", (4, 4), 77)
    assert decode_image(encode(grey, "PNG"))[0, 0].tolist() == [77, 77, 77]


def test_decode_applies_exif_orientation() -> None:
    img = Image.fromarray(frame(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert decode_image(encode(img, "JPEG", exif=exif)).shape == (40, 20, 3)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", b"GIF89a" + b"\0" * 20],
    ids=["empty", "garbage", "gif"],
)
def test_decode_refuses_undecodable_data(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_image(data)


def test_decode_refuses_truncated_data() -> None:
    data = encode(Image.fromarray(frame(64, 64)), "JPEG")
    with pytest.raises(ValueError):
        decode_image(data[: len(data) // 2])


def test_decode_refuses_decompression_bombs() -> None:
    # 64 Mpixel bilevel PNG: a few kB on the wire
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="above"):
        decode_image(bomb)
    small = encode(Image.fromarray(frame(100, 100)), "PNG")
    with pytest.raises(ValueError, match="above"):
        decode_image(small, max_pixels=5000)


def test_decode_data_urls_and_bare_base64() -> None:
    rgb = frame(8, 8)
    png = encode(Image.fromarray(rgb), "PNG")
    b64 = base64.b64encode(png).decode()
    np.testing.assert_array_equal(decode_image_base64(f"data:image/png;base64,{b64}"), rgb)
    np.testing.assert_array_equal(decode_image_base64(b64), rgb)
    for bad in [f"data:text/plain;base64,{b64}", f"data:image/png,{b64}", "data:image/png;base64"]:
        with pytest.raises(ValueError):
            decode_image_base64(bad)
    with pytest.raises(ValueError):
        decode_image_base64("data:image/png;base64,@@@@")
