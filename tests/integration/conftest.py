from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.integration.servers import start_server


@pytest.fixture(scope="session")
def server(tiny_hf_dir, tmp_path_factory):
    """`janus-server serve` on the in-process queue with the tiny model (shared by read-only tests)."""
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


def png_bytes(size=(48, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def image_b64() -> str:
    return b64(png_bytes())
