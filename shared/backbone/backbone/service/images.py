"""Uploaded raster images (PNG, JPEG, TIFF, BMP, WebP, GIF...) decoded to one grey channel, safely.

PIL's ``convert("L")`` clips instead of scaling: a 16-bit PNG or TIFF (industrial and X-ray cameras) comes
out almost white, a float TIFF in [0, 1] almost black. :func:`decode_grey` keeps such images: integer
images are scaled from the bit depth their largest value needs (8, 10, 12, 14 or 16 bits, so a 12-bit
camera's frames in 16-bit files keep their contrast), float images from [0, 1] (or their own range), to
float values on the 8-bit scale [0, 255]. The pixel count is checked before any pixel is decoded
(decompression bombs), EXIF orientation is applied, and colour images are converted to luminance.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
BIT_DEPTHS = (8, 10, 12, 14, 16)


class ImageTooLarge(ValueError):
    """More pixels than the caller accepts (a service answers 413)."""


def _to_8bit_scale(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-depth integer or float pixel values -> float32 on [0, 255]."""
    arr = arr.astype(np.float32)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr)
    lo, hi = float(finite.min()), float(finite.max())
    if mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            full = 1.0
        elif lo >= 0.0 and hi <= 255.0:
            full = 255.0
        else:  # any other range: its own minimum and maximum
            arr = arr - lo
            full = max(hi - lo, 1e-12)
    elif lo < 0 or hi > 2**16 - 1:  # 32-bit integers beyond 16 bits: own range
        arr = arr - lo
        full = max(hi - lo, 1.0)
    else:
        bits = next(b for b in BIT_DEPTHS if hi < 2**b)
        full = float(2**bits - 1)
    return np.nan_to_num(np.clip(arr * (255.0 / full), 0.0, 255.0), nan=0.0)


def _open(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """The decoded, upright image; the limits checked (see :func:`decode_grey`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{img.width}x{img.height} pixels; at most {max_pixels:,}")
            img.load()
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from exc
    except Exception as exc:  # PIL raises many types for corrupt / non-image bytes
        raise ValueError(f"not a decodable image: {type(exc).__name__}: {exc}") from exc
    if img.width < min_side or img.height < min_side:
        raise ValueError(f"image too small ({img.width}x{img.height}); need at least {min_side}x{min_side}")
    return ImageOps.exif_transpose(img)


def decode_grey(data: bytes, *, max_pixels: int, min_side: int = 1) -> np.ndarray:
    """One grey channel (float32, values on [0, 255], shape (H, W)) from an uploaded image; a high-depth
    image keeps its precision.

    Raises :class:`ImageTooLarge` above ``max_pixels`` (checked from the header, before decoding) and
    ``ValueError`` with the reason for bytes that are not a decodable image or a side below ``min_side``."""
    img = _open(data, max_pixels, min_side)
    if img.mode in HIGH_DEPTH_MODES or img.mode == "F":
        return _to_8bit_scale(np.asarray(img), img.mode)
    return np.asarray(img.convert("L"), dtype=np.float32)


def decode_grey_image(data: bytes, *, max_pixels: int, min_side: int = 1) -> Image.Image:
    """:func:`decode_grey` as an 8-bit PIL image ("L"); an 8-bit source is converted by PIL directly, without
    a float copy (the same pixels)."""
    img = _open(data, max_pixels, min_side)
    if img.mode in HIGH_DEPTH_MODES or img.mode == "F":
        return Image.fromarray(np.round(_to_8bit_scale(np.asarray(img), img.mode)).astype(np.uint8), mode="L")
    return img.convert("L")
