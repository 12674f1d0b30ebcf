"""Bad input gets a 4xx whose message names the problem, and the server keeps serving afterwards."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from tests.support.images import b64, png_bytes


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 100_000) -> bytes:
    """A few KB of PNG whose header promises side x side pixels of zeros."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + b"\x00" * (side // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(200)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def big_sparse_png(side: int = 20_000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = b64(png_bytes())
TRUNCATED = b64(png_bytes((64, 64))[:60])

UNDERSTAND_CASES = [
    ("empty image", {"prompt": "q", "images": [""]}, 400, "images[0]"),
    ("garbage base64", {"prompt": "q", "images": ["!!!not-base64***"]}, 400, "base64"),
    ("truncated image", {"prompt": "q", "images": [TRUNCATED]}, 400, "images[0]"),
    ("not an image", {"prompt": "q", "images": [b64(b"hello, I am a text file")]}, 400, "not a decodable image"),
    # a 1x1 image is fine: the processor pads it to square (tests/integration/test_conversations.py)
    ("20000x20000 image", {"prompt": "q", "images": [b64(big_sparse_png())]}, 400, "pixels"),
    ("png bomb", {"prompt": "q", "images": [b64(png_bomb())]}, 400, "pixels"),
    ("data url without base64", {"prompt": "q", "images": ["data:image/png,abc"]}, 400, "base64"),
    ("remote url", {"prompt": "q", "images": ["https://example.com/a.png"]}, 400, "URL"),
    ("no images", {"prompt": "q", "images": []}, 422, "images"),
    ("too many images", {"prompt": "q", "images": [GOOD] * 5}, 400, "at most 4"),
    ("huge prompt", {"prompt": "x" * 100_000, "images": [GOOD]}, 400, "prompt"),
    ("empty prompt", {"prompt": "", "images": [GOOD]}, 422, "prompt"),
    ("reserved token in prompt", {"prompt": "<image_placeholder> hi", "images": [GOOD]}, 400, "reserved token"),
    ("negative temperature", {"prompt": "q", "images": [GOOD], "temperature": -1}, 422, "temperature"),
    ("top_p zero", {"prompt": "q", "images": [GOOD], "top_p": 0}, 422, "top_p"),
    ("max_new_tokens zero", {"prompt": "q", "images": [GOOD], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("max_new_tokens huge", {"prompt": "q", "images": [GOOD], "max_new_tokens": 10**6}, 400, "max_new_tokens"),
    ("context overflow", {"prompt": "q", "images": [GOOD], "max_new_tokens": 2000}, 400, "context length"),
    ("wrong type prompt", {"prompt": 123, "images": [GOOD]}, 422, "prompt"),
    ("wrong type images", {"prompt": "q", "images": "abc"}, 422, "images"),
    ("unknown field", {"prompt": "q", "images": [GOOD], "colour": "red"}, 422, "colour"),
    ("negative seed", {"prompt": "q", "images": [GOOD], "seed": -5}, 422, "seed"),
]

GENERATE_CASES = [
    ("n zero", {"prompt": "a", "n": 0}, 422, "n"),
    ("n 1000", {"prompt": "a", "n": 1000}, 400, "n must be between 1 and 16"),
    ("negative temperature", {"prompt": "a", "temperature": -0.5}, 422, "temperature"),
    ("cfg too large", {"prompt": "a", "cfg_weight": 1e9}, 422, "cfg_weight"),
    ("wrong type n", {"prompt": "a", "n": "two"}, 422, "n"),
    ("float n", {"prompt": "a", "n": 1.5}, 422, "n"),
    ("unknown field", {"prompt": "a", "style": "vivid"}, 422, "style"),
    ("steps on a VQ model", {"prompt": "a", "steps": 50}, 400, "steps applies to rectified-flow models"),
    ("missing prompt", {"n": 1}, 422, "prompt"),
    ("huge prompt", {"prompt": "y" * 100_000}, 400, "prompt"),
    ("seed too big", {"prompt": "a", "seed": 2**64}, 422, "seed"),
]


def _assert_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert needle.lower() in body["error"]["message"].lower(), body


@pytest.mark.parametrize(("name", "body", "status", "needle"), UNDERSTAND_CASES, ids=[c[0] for c in UNDERSTAND_CASES])
def test_understand_bad_input(server, name, body, status, needle):
    _assert_error(httpx.post(server.url + "/v1/understand", json=body, timeout=60), status, needle)


@pytest.mark.parametrize(("name", "body", "status", "needle"), GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_bad_input(server, name, body, status, needle):
    _assert_error(httpx.post(server.url + "/v1/generate", json=body, timeout=60), status, needle)


def test_malformed_json_and_content_types(server):
    r = httpx.post(server.url + "/v1/understand", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(r, 400, "JSON")
    r = httpx.post(server.url + "/v1/understand", content=b"hello", headers={"content-type": "text/plain"})
    _assert_error(r, 415, "content type")
    r = httpx.post(server.url + "/v1/generate", content=b"[1, 2", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_multipart_bad_input(server):
    r = httpx.post(server.url + "/v1/understand", data={"prompt": "q"},
                   files=[("image", ("x.txt", b"not an image", "text/plain"))])
    _assert_error(r, 400, "not a decodable image")
    r = httpx.post(server.url + "/v1/understand", data={"prompt": "q", "temperature": "hot"},
                   files=[("image", ("a.png", png_bytes(), "image/png"))])
    _assert_error(r, 422, "temperature")
    r = httpx.post(server.url + "/v1/understand", data={"prompt": "q"}, files=[("other", ("a.png", png_bytes()))])
    _assert_error(r, 400, "image")


def test_server_keeps_serving_after_bad_input(server):
    for body in [c[1] for c in UNDERSTAND_CASES[:8]]:
        httpx.post(server.url + "/v1/understand", json=body, timeout=60)
    good = httpx.post(server.url + "/v1/understand", json={"prompt": "q", "images": [GOOD], "max_new_tokens": 3},
                      timeout=60)
    assert good.status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    assert base64.b64decode(GOOD)  # the fixture image itself is valid
