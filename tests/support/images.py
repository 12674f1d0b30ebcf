"""Small valid images for requests: a PNG of a given size and colour, and base64 text of any bytes."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_bytes(size=(48, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
