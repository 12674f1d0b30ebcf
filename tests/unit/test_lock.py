"""The lock (requirements/*.txt) agrees with pyproject.toml: every dependency the project declares is
pinned, with hashes, at a version its range allows, for every Python the project supports; serve's
and api's pins are test's pins; torch is left to the installer; the api image's lock (api.in -> api.txt)
is pyproject.toml's dependencies without the model runtime. Editing pyproject.toml without running
`scripts/lock.sh --no-upgrade` fails here, not on a fresh machine."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYTHONS = ["3.11", "3.12", "3.13"]
# Declared dependencies only the model runtime imports: requirements/api.in (the api image) leaves them out.
MODEL_RUNTIME = {"torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "diffusers", "torchao"}


def _pins(path: Path) -> list[tuple[Requirement, list[str]]]:
    """(requirement, hashes) for each entry of a `uv pip compile --generate-hashes` file."""
    entries: list[tuple[Requirement, list[str]]] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("--hash="):
            entries[-1][1].append(stripped.removeprefix("--hash=").rstrip(" \\"))
        else:
            entries.append((Requirement(stripped.rstrip(" \\")), []))
    return entries


def _versions(path: Path, python: str) -> dict[str, str]:
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    pinned: dict[str, str] = {}
    for req, hashes in _pins(path):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==" and hashes, f"{path.name}: {req} is not pinned with hashes"
        assert canonicalize_name(req.name) not in pinned, f"{path.name}: {req.name} pinned twice for {python}"
        pinned[canonicalize_name(req.name)] = spec.version
    return pinned


def _declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    if extra:
        deps += [Requirement(d) for d in project["optional-dependencies"][extra]]
    return [d for d in deps if canonicalize_name(d.name) != "janus-server"]


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("lock, extra", [("serve.txt", None), ("test.txt", "test")])
def test_every_declared_dependency_is_pinned_within_its_range(lock, extra, python):
    pinned = _versions(REPO / "requirements" / lock, python)
    assert "torch" not in pinned, "torch is installed on its own (CPU or CUDA build), never from the lock"
    for dep in _declared(extra):
        name = canonicalize_name(dep.name)
        if name == "torch":
            continue
        assert name in pinned, f"{lock}: {dep.name} is declared in pyproject.toml but not locked"
        assert dep.specifier.contains(pinned[name], prereleases=True), (
            f"{lock}: {dep.name}=={pinned[name]} is outside pyproject.toml's {dep.specifier}")


@pytest.mark.parametrize("python", PYTHONS)
def test_serve_pins_are_test_pins(python):
    serve, test = (_versions(REPO / "requirements" / f, python) for f in ("serve.txt", "test.txt"))
    assert {name: test.get(name) for name in serve} == serve


def _api_in() -> list[Requirement]:
    lines = (REPO / "requirements" / "api.in").read_text().splitlines()
    return [Requirement(line.split("#", 1)[0]) for line in lines if line.split("#", 1)[0].strip()]


def test_api_in_is_pyproject_without_the_model_runtime():
    """Same ranges and security floors as pyproject.toml, every declared dependency but the model runtime."""
    declared = {canonicalize_name(d.name): str(d) for d in _declared(None)}
    assert set(declared) >= MODEL_RUNTIME
    assert {canonicalize_name(r.name): str(r) for r in _api_in()} == {
        name: spec for name, spec in declared.items() if name not in MODEL_RUNTIME}


@pytest.mark.parametrize("python", PYTHONS)
def test_api_lock_is_test_pins_without_the_model_runtime(python):
    api, test = (_versions(REPO / "requirements" / f, python) for f in ("api.txt", "test.txt"))
    assert {name: test.get(name) for name in api} == api
    for dep in _api_in():
        name = canonicalize_name(dep.name)
        assert name in api and dep.specifier.contains(api[name], prereleases=True), f"api.txt: {dep}"
    heavy = MODEL_RUNTIME | {"triton", "sympy", "networkx"}
    assert not [name for name in api if name in heavy or name.startswith("nvidia-")], "the api image has no torch"


def test_the_installers_use_the_lock():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert '--require-hashes -r "$lock"' in setup and 'lock="requirements/${extra:-serve}.txt"' in setup
    assert "scripts/setup.sh test" in (REPO / "scripts" / "test.sh").read_text()
    assert "--require-hashes -r requirements/serve.txt" in (REPO / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/api.txt" in (REPO / "Dockerfile").read_text()
    assert "requirements/api.in requirements/build.in --constraint requirements/test.txt -o requirements/api.txt" in (
        REPO / "scripts" / "lock.sh").read_text()
