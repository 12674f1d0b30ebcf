"""Images in and out: untrusted bytes decoded safely (size checked from the header before pixels are
decoded), and generated pixels encoded as PNG, JPEG or WebP.

Images are read as a viewer shows them: the EXIF orientation is applied (a phone photo taken
upright reads upright) and 16-bit greyscale is scaled to 8 bits (Pillow's RGB conversion would
clip it, reading mid-grey 32768 as white). Any size down to 1x1 is accepted: the processor pads
to square, as transformers' does.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from janus_core.errors import InvalidRequestError

# What a client may send: the formats the model's users have, none of Pillow's long tail (EPS runs
# Ghostscript; PSD, TGA, JPEG 2000 and the rest only widen what a crafted file can reach).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def open_image(data: bytes, *, max_pixels: int = 40_000_000, min_side: int = 1, label: str = "image") -> Image.Image:
    """The image with only its header read: format and size checked, no pixel decoded yet."""
    if not data:
        raise InvalidRequestError(f"{label} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{label} is not a decodable image (accepted: {', '.join(FORMATS)}; "
                                  f"{type(exc).__name__}: {exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequestError(f"{label} is truncated or corrupt ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequestError(f"{label} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if min(width, height) < min_side:
        raise InvalidRequestError(f"{label} is {width}x{height}; each side must be at least {min_side} pixels")
    return image


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, min_side: int = 1, label: str = "image") -> Image.Image:
    """Return an RGB image or raise `InvalidRequestError` naming what is wrong with it."""
    image = load_image(open_image(data, max_pixels=max_pixels, min_side=min_side, label=label), label)
    ImageOps.exif_transpose(image, in_place=True)  # turned upright; without an orientation, no copy
    return _to_rgb(image)


def load_image(image: Image.Image, label: str = "image") -> Image.Image:
    """Decode the pixels of an `open_image` result in the file's own mode (no conversion copies); a broken file
    raises `InvalidRequestError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{label} is not a decodable image ({type(exc).__name__}: {exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequestError(f"{label} is truncated or corrupt ({exc})") from exc
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I;16B", ...) or 32-bit ints holding it
        # round(v / 257) in integers, a band of rows at a time: no full-size copy beyond the 8-bit result
        width, height = image.size
        out = np.empty((height, width), dtype=np.uint8)
        for top in range(0, height, STRIP_ROWS):
            values = np.asarray(image.crop((0, top, width, min(top + STRIP_ROWS, height))))
            values = np.clip(values, 0, 65535).astype(np.uint16, copy=False)
            quotient, remainder = np.divmod(values, np.uint16(257))
            quotient += remainder >= 129
            out[top:top + len(quotient)] = quotient
        image = Image.fromarray(out)  # uint8 2-D: mode "L"
    return image.convert("RGB")


STRIP_ROWS = 256


# --- out -----------------------------------------------------------------------------------------
def encode_png(pixels: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 image as PNG bytes."""
    return encode_image(pixels)


IMAGE_FORMATS = ("png", "jpeg", "webp")


def encode_image(pixels: np.ndarray, output_format: str = "png", quality: int | None = None) -> bytes:
    """One (H, W, 3) uint8 image as PNG, JPEG or WebP bytes (Pillow's encoders: the same pixels give the same
    bytes). `quality` (0-100) applies to JPEG and WebP; None: Pillow's default (75 and 80)."""
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(IMAGE_FORMATS)}, got {output_format!r}")
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format=output_format.upper(), **({} if quality is None else {"quality": quality}))
    return buf.getvalue()
