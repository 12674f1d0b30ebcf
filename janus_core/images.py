"""Decoding untrusted image bytes safely: size checked from the header before pixels are decoded.

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


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, min_side: int = 1, label: str = "image") -> Image.Image:
    """Return an RGB image or raise `InvalidRequestError` naming what is wrong with it."""
    if not data:
        raise InvalidRequestError(f"{label} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"{label} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            if min(width, height) < min_side:
                raise InvalidRequestError(f"{label} is {width}x{height}; each side must be at least {min_side} pixels")
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{label} is not a decodable image ({type(exc).__name__}: {exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequestError(f"{label} is truncated or corrupt ({exc})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I;16B", ...) or 32-bit ints holding it
        scaled = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled)  # uint8 2-D: mode "L"
    return image.convert("RGB")
