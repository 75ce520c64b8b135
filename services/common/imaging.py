"""Image decoding and normalisation, written once for every engine.

The predictor, the TorchServe handler and Triton's python ``preprocess`` model all call
:func:`decode_image` and :func:`preprocess`, and the training data pipeline calls
:func:`preprocess` too, so the same bytes give the same tensor everywhere. This module needs
only NumPy, Pillow and :mod:`services.common.errors` (no torch), which keeps the Triton
preprocessing model light.

Pipeline: base64 text -> bytes -> PIL image (limits checked from the header, before any
pixel is decoded) -> RGB (palette, alpha, CMYK, 16-bit and grayscale handled) -> resize of the
shorter side + centre crop to the model's input size -> float32 CHW, ``(x/255 - mean) / std``.

What a decode may cost is bounded before it starts, because a few kilobytes of PNG can claim
millions of pixels: :func:`open_image` reads only the header, picks the reduced decoding the
format has (a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 of its size while that still gives
at least :data:`JPEG_DRAFT_SIZE`), and refuses an image whose decoded size is over
``max_pixels`` pixels or whose decoded bytes (width x height x bands x bytes per sample) are
over :func:`max_decoded_bytes`. Only then does :func:`load_image` decode the pixels. Callers
that batch can look at :func:`decoded_bytes` in between and decode a large image on its own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from services.common.errors import IMAGE_TOO_LARGE, INVALID_TYPE, ServiceError, image_error_status

#: The serving config's default ``max_pixels`` (:mod:`services.common.serving`): the most
#: pixels an image may decode into, 2048 x 2048. The models here take 32 x 32 images, and a
#: JPEG photo counts at the size it is decoded at (a 12-megapixel one at 1/8: 0.19 megapixels).
DEFAULT_MAX_PIXELS = 2048 * 2048
#: Bytes a decoded image may take per allowed pixel: ``max_pixels`` pixels of 8-bit RGB, the
#: form every image is converted to. An image with more bands or deeper samples (RGBA, CMYK,
#: 32-bit gray) is allowed fewer pixels, because it costs more memory to decode and convert.
BYTES_PER_ALLOWED_PIXEL = 3
#: A JPEG is decoded at the smallest libjpeg scale that still covers this size (the resize to
#: the model's input that follows needs no more).
JPEG_DRAFT_SIZE = (256, 256)

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_BASE64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


class ImageDecodeError(ServiceError, ValueError):
    """The caller sent something that is not a usable image. ``code`` is machine-readable; the
    status comes from it (:func:`~services.common.errors.image_error_status`)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)
        self.status_code = image_error_status(code)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: CHW float32 of ``height``x``width``, normalised per channel."""

    height: int = 32
    width: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    name: str = "input"
    dtype: str = "FP32"
    channels: int = 3
    layout: str = "NCHW"
    resize: str = "shorter-side bilinear, centre crop"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def decode_base64(text: str) -> bytes:
    """Strict base64 decoding; a ``data:image/...;base64,`` prefix and whitespace are allowed."""
    if not isinstance(text, str):
        raise ImageDecodeError("image must be a base64 string", INVALID_TYPE)
    text = _DATA_URL.sub("", text.strip(), count=1)
    raw = "".join(text.split()).encode("ascii", errors="replace")
    if not raw:
        raise ImageDecodeError("image is empty", "empty_image")
    if not _BASE64_CHARS.match(raw):
        raise ImageDecodeError("image is not valid base64", "invalid_base64")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(
            "image is not valid base64 (bad padding)", "invalid_base64"
        ) from None


def max_decoded_bytes(max_pixels: int) -> int:
    """The most bytes a decoded image may take under a pixel limit of ``max_pixels``."""
    return max_pixels * BYTES_PER_ALLOWED_PIXEL


def decoded_bytes(image: Image.Image) -> int:
    """The bytes of ``image``'s pixels once decoded (width x height x bands x bytes per
    sample), known from the header alone."""
    width, height = image.size
    try:
        mode = ImageMode.getmode(image.mode)
        sample = max(1, int(mode.typestr[-1]))  # "|u1", "<u2", "<i4", "<f4"; "|b1" is a byte
        bands = len(mode.bands)
    except (KeyError, ValueError):
        sample, bands = 4, 4  # a mode Pillow has but not ImageMode: assume the widest
    return width * height * bands * sample


@contextlib.contextmanager
def _decoder_errors() -> Iterator[None]:
    """Pillow's and the decoders' exceptions as :class:`ImageDecodeError`, with a code."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and at 2x raises) for big images; our own limits are the rule.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("data is not a recognised image format", "not_an_image") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(str(exc), IMAGE_TOO_LARGE) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"image could not be decoded: {exc}", "corrupt_image") from None


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image in ``data`` with its header read and its limits checked, no pixel decoded.

    A JPEG is set to decode at a reduced size first (``draft``), so the limits apply to what
    will really be decoded. Too many pixels or bytes is a 413 (``image_too_large``).
    """
    if not data:
        raise ImageDecodeError("image is empty", "empty_image")
    with _decoder_errors():
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError("image has no pixels", "not_an_image")
        if image.format == "JPEG":
            # libjpeg scales big photos down while decoding: far less work for small targets.
            image.draft("RGB", JPEG_DRAFT_SIZE)
        pixels = image.size[0] * image.size[1]
        if pixels > max_pixels:
            raise ImageDecodeError(
                f"image is {width}x{height} = {width * height} pixels"
                + (
                    f", decoded at {image.size[0]}x{image.size[1]}"
                    if pixels != width * height
                    else ""
                )
                + f", more than the limit of {max_pixels}",
                IMAGE_TOO_LARGE,
            )
        size = decoded_bytes(image)
        if size > max_decoded_bytes(max_pixels):
            raise ImageDecodeError(
                f"image is {width}x{height} in mode {image.mode}: {size} bytes decoded, more "
                f"than the limit of {max_decoded_bytes(max_pixels)} bytes",
                IMAGE_TOO_LARGE,
            )
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image` and convert them to RGB."""
    with _decoder_errors():
        image.load()
        return to_rgb(image)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image, refusing bombs and broken files."""
    return load_image(open_image(data, max_pixels))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparent pixels become black, the training background."""
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/APNG: the first frame (is_animated reads no frame)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # round(x * 255 / 65535) in integers: 4 bytes a pixel of scratch, not float64's 16+.
        wide = np.asarray(image).astype(np.uint32)
        wide *= 510
        wide += 65535
        wide //= 131070
        return Image.fromarray(wide.astype(np.uint8), mode="L").convert("RGB")
    if mode == "I":
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image, spec: InputSpec) -> npt.NDArray[np.float32]:
    """RGB image -> float32 array of ``spec.shape``, normalised with the spec's mean and std."""
    if image.mode != "RGB":
        image = to_rgb(image)
    image = ImageOps.fit(
        image, (spec.width, spec.height), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5)
    )
    array = np.asarray(image, dtype=np.float32) / 255.0  # HWC
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_and_preprocess(
    data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> npt.NDArray[np.float32]:
    """Encoded image bytes -> normalised float32 CHW array (the one entry point engines use)."""
    return preprocess(decode_image(data, max_pixels=max_pixels), spec)
