"""The decoder's limits: what an image may cost is decided from its header, before any pixel is
decoded (the files here claim sizes their data does not hold, so a decode would fail as
corrupt rather than be refused as too large)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common import imaging
from services.common.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    decoded_bytes,
    max_decoded_bytes,
    open_image,
    to_rgb,
)
from services.common.serving import ServingConfig
from tests.images import encode, sixteen_bit_png


def png_header_only(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose one IDAT chunk holds a few
    rows of zeros: refused as too large only if the header decides it, corrupt otherwise."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


def test_the_default_is_one_setting_and_far_below_40_megapixels() -> None:
    assert ServingConfig().max_pixels == DEFAULT_MAX_PIXELS == 2048 * 2048
    assert max_decoded_bytes(DEFAULT_MAX_PIXELS) == 2048 * 2048 * 3


def test_a_16_bit_40_megapixel_png_is_refused_from_its_header() -> None:
    data = sixteen_bit_png(8000, 5000)
    assert len(data) < 200_000  # tens of kilobytes claiming 80 MB of pixels
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.status_code == 413
    assert info.value.code == "image_too_large"
    assert "8000x5000" in info.value.message
    # The header decided: the same claim with no real pixel data behind it is refused alike.
    with pytest.raises(ImageDecodeError) as claimed:
        decode_image(png_header_only(8000, 5000, bit_depth=16, colour_type=0))
    assert claimed.value.code == "image_too_large"


@pytest.mark.parametrize(
    ("mode", "bytes_per_pixel"),
    [("L", 1), ("P", 1), ("I;16", 2), ("RGB", 3), ("RGBA", 4), ("CMYK", 4), ("I", 4), ("F", 4)],
)
def test_decoded_bytes_are_bands_times_sample_size(mode: str, bytes_per_pixel: int) -> None:
    assert decoded_bytes(Image.new(mode, (7, 5))) == 7 * 5 * bytes_per_pixel


def test_the_byte_limit_gives_wider_modes_fewer_pixels() -> None:
    """2048 x 2048 is within the pixel limit; as RGB it is exactly the byte limit, as RGBA
    (4 bytes a pixel) a third over it, refused from the header alone."""
    assert open_image(png_header_only(2048, 2048, 8, 2)).size == (2048, 2048)  # RGB
    with pytest.raises(ImageDecodeError) as info:
        open_image(png_header_only(2048, 2048, 8, 6))  # RGBA
    assert info.value.code == "image_too_large"
    assert "bytes decoded" in info.value.message
    # One pixel over in a mode that fits the bytes: the pixel limit still holds.
    with pytest.raises(ImageDecodeError):
        open_image(png_header_only(2048 * 2048 + 1, 1, 8, 0))


def test_a_large_jpeg_counts_at_its_reduced_decoding_size() -> None:
    """A 12-megapixel photo is decoded by libjpeg at 1/8 (500 x 375, still above the 256 the
    resize needs), so it is served; the same pixels as a PNG are refused."""
    photo = Image.new("RGB", (4000, 3000), (200, 30, 90))
    jpeg = open_image(encode(photo, "JPEG", quality=90))
    assert jpeg.size == (500, 375)
    assert min(jpeg.size) >= min(imaging.JPEG_DRAFT_SIZE)
    with pytest.raises(ImageDecodeError) as info:
        open_image(png_header_only(4000, 3000, 8, 2))
    assert info.value.code == "image_too_large"


def test_sixteen_bit_conversion_rounds_like_before() -> None:
    """Integer arithmetic (4 bytes a pixel of scratch) gives exactly what the float64 formula
    gave: round(x * 255 / 65535), for every 16-bit value."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    converted = np.asarray(to_rgb(Image.fromarray(values)))
    expected = np.clip(values.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert converted.shape == (256, 256, 3)
    assert (converted == expected[..., None]).all()


def test_an_animated_gif_is_its_first_frame() -> None:
    frames = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    first = decode_image(buffer.getvalue())
    assert np.asarray(first).max() == 0
