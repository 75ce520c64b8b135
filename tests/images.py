"""Image builders for the tests: base64, odd-but-valid formats and hostile files."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid-looking 1-bit PNG claiming ``width`` x ``height``: a few hundred bytes that would
    decode to 400 megapixels. Its rows are zlib-compressed zeros (only the first few are there,
    which is enough: the header alone must get it refused)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = zlib.compress(row * 16, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def sixteen_bit_png(width: int = 8000, height: int = 5000) -> bytes:
    """A real 16-bit grayscale PNG, 40 megapixels by default: its zeros compress to under
    100 KB, and decoded it is 80 MB (more, converted): the decode-amplification case."""
    return encode(Image.fromarray(np.zeros((height, width), dtype=np.uint16)), "PNG")


#: Variants that carry exactly the pixels of the source image (so the eager model's answer).
LOSSLESS = ("png_16bit", "gif", "webp_lossless", "bmp", "tiff")


def odd_variants(png: bytes) -> dict[str, bytes]:
    """The same digit in formats and modes a user might send, all of which must be served."""
    gray = Image.open(io.BytesIO(png)).convert("L")
    big = gray.resize((32, 32), Image.Resampling.BILINEAR)
    rgb = big.convert("RGB")

    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # mode I;16
    assert sixteen.mode == "I;16"
    palette_alpha = rgb.convert("RGBA")
    alpha = np.asarray(big, dtype=np.uint8)
    palette_alpha.putalpha(Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8)))
    palette_alpha = palette_alpha.quantize(colors=64)  # P + tRNS: palette with transparency
    assert palette_alpha.mode == "P"

    frames = [rgb.convert("P"), rgb.rotate(5).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    large = rgb.resize((4000, 3000), Image.Resampling.BICUBIC)

    return {
        "cmyk_jpeg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "png_16bit": encode(sixteen, "PNG"),
        "gif": encode(gray.convert("P"), "GIF"),
        "gif_animated": animated.getvalue(),
        "png_palette_alpha": encode(palette_alpha, "PNG"),
        "png_gray_alpha": encode(big.convert("LA"), "PNG"),
        "png_rgba": encode(rgb.convert("RGBA"), "PNG"),
        "webp_lossless": encode(gray.convert("RGB"), "WEBP", lossless=True),
        "webp_lossy": encode(rgb, "WEBP", quality=80),
        "jpeg_large_4000x3000": encode(large, "JPEG", quality=90),
        "jpeg_exif_rotated": encode(rgb, "JPEG", quality=95, exif=exif),
        "bmp": encode(gray.convert("RGB"), "BMP"),
        "tiff": encode(gray, "TIFF"),
        "jpeg_grayscale": encode(big, "JPEG", quality=95),
    }
