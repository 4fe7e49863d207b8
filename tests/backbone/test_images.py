"""Uploaded images decoded to grey: 16-bit and float images scaled, not clipped; limits before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from backbone.service.images import ImageTooLarge, decode_grey, decode_grey_image
from PIL import Image


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 60)).astype(np.uint8)


def test_eight_bit_and_colour_images_read_as_pil_luminance(grey: np.ndarray) -> None:
    rgb = Image.fromarray(np.stack([grey, grey[::-1], grey[:, ::-1]], axis=-1))
    assert np.array_equal(decode_grey(_encode(Image.fromarray(grey)), max_pixels=10**6), grey)
    assert np.array_equal(decode_grey(_encode(rgb), max_pixels=10**6), np.asarray(rgb.convert("L")))


def test_high_bit_depth_images_keep_their_contrast(grey: np.ndarray) -> None:
    full16 = decode_grey(_encode(Image.fromarray(grey.astype(np.uint16) * 257)), max_pixels=10**6)
    assert np.allclose(full16, grey, atol=1e-3)  # PIL's convert("L") would clip this to white
    twelve = decode_grey(_encode(Image.fromarray(grey.astype(np.uint16) * 16)), max_pixels=10**6)
    assert np.abs(twelve - grey).max() <= 1.0  # a 12-bit camera's frame in a 16-bit file
    unit = decode_grey(_encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"), max_pixels=10**6)
    assert np.allclose(unit, grey, atol=1e-3)
    celsius = decode_grey(
        _encode(Image.fromarray(grey.astype(np.float32) * 2 - 300), "TIFF"), max_pixels=10**6
    )
    assert celsius.min() == 0.0 and celsius.max() == 255.0  # any other float range: its own


def test_limits_and_undecodable_bytes(grey: np.ndarray) -> None:
    with pytest.raises(ImageTooLarge, match="at most"):
        decode_grey(_encode(Image.fromarray(grey)), max_pixels=1000)
    with pytest.raises(ValueError, match="too small"):
        decode_grey(_encode(Image.fromarray(grey[:4, :4])), max_pixels=10**6, min_side=8)
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_grey(b"<svg xmlns='http://www.w3.org/2000/svg'/>", max_pixels=10**6)
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_grey(_encode(Image.fromarray(grey), "JPEG")[:300], max_pixels=10**6)


def test_the_8_bit_image_form_matches_the_array_form(grey: np.ndarray) -> None:
    for img in (Image.fromarray(grey), Image.fromarray(grey.astype(np.uint16) * 16)):
        data = _encode(img)
        as_image = decode_grey_image(data, max_pixels=10**6)
        assert as_image.mode == "L"
        assert np.array_equal(
            np.asarray(as_image), np.round(decode_grey(data, max_pixels=10**6)).astype(np.uint8)
        )
