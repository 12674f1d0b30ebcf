"""scripts/setup.sh installs from the lock, returns at once when nothing it depends on changed (pyproject.toml,
the lock files, the torch pin), and installs again when it did.

It runs on a copy of the script and pyproject.toml whose `.venv/bin/python` is a stand-in that
records each call, so the test sees whether pip would have run without installing anything.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls"
"""


def _checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("janus-server", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return tmp_path


def _setup(root: Path, *args: str, **env: str) -> list[str]:
    """Run setup.sh; return the stand-in python's calls made by this run."""
    calls = root / ".venv" / "calls"
    before = calls.read_text().splitlines() if calls.exists() else []
    clean_env = {k: v for k, v in os.environ.items() if k not in ("JANUS_SETUP_FORCE", "JANUS_TORCH_VERSION")}
    subprocess.run(["bash", str(root / "scripts" / "setup.sh"), *args], check=True, timeout=60,
                   env={**clean_env, **env})
    after = calls.read_text().splitlines() if calls.exists() else []
    return after[len(before):]


def test_installs_once_then_skips_until_something_changes(tmp_path):
    root = _checkout(tmp_path)
    first = _setup(root, "test")
    assert any("pip install" in c and "--require-hashes -r requirements/test.txt" in c for c in first), first
    assert any("pip install" in c and "--no-deps --no-build-isolation -e ." in c for c in first), first
    assert _setup(root, "test") == []
    assert _setup(root) == []  # the test install covers the plain one
    with open(root / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    assert any("pip install" in c for c in _setup(root))
    assert _setup(root) == []
    with open(root / "requirements" / "serve.txt", "a") as f:
        f.write("\n# a refreshed lock\n")
    assert any("-r requirements/serve.txt" in c for c in _setup(root))
    assert any("pip install" in c for c in _setup(root, JANUS_TORCH_VERSION="2.99.0"))
    assert any("pip install" in c for c in _setup(root, JANUS_SETUP_FORCE="1"))
