"""Fixtures of the integration tests: one `janus-server serve` of the tiny model shared by read-only tests."""

from __future__ import annotations

import pytest

from tests.support.images import b64, png_bytes
from tests.support.servers import start_server


@pytest.fixture(scope="session")
def server(tiny_hf_dir, tmp_path_factory):
    """`janus-server serve` on the in-process queue with the tiny model (shared by read-only tests)."""
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def image_b64() -> str:
    return b64(png_bytes())
