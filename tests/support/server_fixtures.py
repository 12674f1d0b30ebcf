"""Server fixtures shared by more than one folder of tests (registered in tests/conftest.py with `pytest_plugins`)."""

from __future__ import annotations

import pytest

from tests.support.servers import start_server


@pytest.fixture(scope="module")
def flow_server(tiny_flow_dir, tmp_path_factory):
    proc = start_server(["serve", "--model", str(tiny_flow_dir)], tmp_path_factory.mktemp("flow-logs"))
    yield proc
    proc.stop()
