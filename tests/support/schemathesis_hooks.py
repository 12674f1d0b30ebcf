"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks): real images.

No schema can say "a decodable image", so fuzzed image fields are strings or bytes that the server
rightly refuses. For the run that fuzzes the understanding success path, `before_call` swaps every
image in a generated request (JSON `images`, multipart `image` parts, chat `image_url` parts) for a
small valid PNG of a size and colour derived from what was generated; everything else is left as
generated. Negative cases (meant to be refused) are left alone.
"""

from __future__ import annotations

import base64
import io
import zlib
from typing import Any

import schemathesis
from PIL import Image
from schemathesis.transport.serialization import Binary


def png(seed: object) -> bytes:
    n = zlib.crc32(repr(seed).encode())
    side = 8 + n % 24
    buf = io.BytesIO()
    Image.new("RGB", (side, 8 + (n >> 8) % 24), (n & 255, (n >> 8) & 255, (n >> 16) & 255)).save(buf, format="PNG")
    return buf.getvalue()


def _b64(seed: object) -> str:
    return base64.b64encode(png(seed)).decode()


def _chat_parts(messages: Any) -> None:
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                ref = part.get("image_url")
                url = f"data:image/png;base64,{_b64(ref)}"
                if isinstance(ref, dict) and isinstance(ref.get("url"), str):
                    ref["url"] = url
                elif isinstance(ref, str):
                    part["image_url"] = url


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    meta = getattr(case, "_meta", None)  # schemathesis keeps the generation mode there
    if not isinstance(body, dict) or (meta is not None and meta.generation.mode.name != "POSITIVE"):
        return  # a negative case stays as generated: the server must refuse it as it is
    path = case.operation.path
    if path == "/v1/understand":
        images = body.get("images")
        if isinstance(images, list) and all(isinstance(i, str) for i in images):
            body["images"] = [_b64(s) if i % 2 else f"data:image/png;base64,{_b64(s)}"  # both spellings
                              for i, s in enumerate(images)]
        parts = body.get("image")
        if isinstance(parts, list) and all(isinstance(p, Binary | bytes) for p in parts):  # generated as binary
            body["image"] = [Binary(png(getattr(p, "data", p))) for p in parts]
    elif path == "/v1/chat/completions":
        _chat_parts(body.get("messages"))
