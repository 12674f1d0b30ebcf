"""Serving the playground: on by default, off with --no-playground, open behind an API key, and shipped in the wheel.

The app runs in a real uvicorn server on a free port, without a model: these routes never touch one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, settings_from
from server.settings import Settings
from tests.support.app_server import serving

REPO = Path(__file__).resolve().parents[2]
STATIC = ["playground.html", "playground.css", "playground.js"]


def test_served_at_root_and_playground_with_its_assets():
    with serving(Settings()) as url:
        root, named = httpx.get(url + "/"), httpx.get(url + "/playground")
        assert root.status_code == named.status_code == 200
        assert root.content == named.content and b"<title>Janus playground</title>" in root.content
        assert root.headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in root.headers["content-security-policy"]
        js = httpx.get(url + "/playground/playground.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/playground/playground.css").headers["content-type"].startswith("text/css")
        missing = httpx.get(url + "/playground/../settings.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert "/" not in httpx.get(url + "/openapi.json").json()["paths"]  # not part of the API contract


def test_no_playground_turns_it_off():
    with serving(Settings(playground=False)) as url:
        for path in ("/", "/playground", "/playground/playground.js"):
            response = httpx.get(url + path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
        assert httpx.get(url + "/health").status_code == 200


def test_behind_an_api_key_only_the_page_is_open():
    with serving(Settings(api_key=["s3cret"])) as url:
        assert httpx.get(url + "/").status_code == 200
        assert httpx.get(url + "/playground/playground.js").status_code == 200
        assert b"s3cret" not in httpx.get(url + "/").content
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 401


@pytest.mark.parametrize(("argv", "env", "playground", "log_json"), [
    (["serve", "--model", "m"], {}, True, True),
    (["serve", "--model", "m", "--no-playground", "--no-log-json"], {}, False, False),
    (["api", "--queue", "redis://x"], {"JANUS_PLAYGROUND": "false", "JANUS_LOG_JSON": "false"}, False, False),
    (["serve", "--model", "m", "--playground"], {"JANUS_PLAYGROUND": "false"}, True, True),  # the flag wins
])
def test_flags_and_environment(argv, env, playground, log_json, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_from(build_parser().parse_args(argv))
    assert (settings.playground, settings.log_json) == (playground, log_json)


def test_the_wheel_ships_the_page(tmp_path):
    """An installed wheel (the container images install one) has the page, not only the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("janus_core", "server"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("janus_server-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"server/http/static/{name}" for name in STATIC} <= names
