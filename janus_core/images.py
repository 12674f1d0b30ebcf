"""Decoding untrusted image bytes safely: size checked from the header before pixels are decoded."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from janus_core.errors import InvalidRequestError


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, min_side: int = 8, label: str = "image") -> Image.Image:
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
            return image.convert("RGB")
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{label} is not a decodable image ({type(exc).__name__}: {exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequestError(f"{label} is truncated or corrupt ({exc})") from exc
