"""Every `JANUS_*` variable and CLI flag the deployment files set is a real setting of server.settings,
with a value the settings object accepts."""

from __future__ import annotations

import os
import re

import pytest

from server.settings import Settings
from tests.support.deploy import DEPLOY, KUSTOMIZATIONS, REPO, by_kind, containers, load_compose, render

FIELDS = set(Settings.model_fields)
DOCKERFILE_TEXT = (REPO / "Dockerfile").read_text()


def _compose_environments() -> dict[str, dict[str, str]]:
    out = {}
    for path in (REPO / "docker-compose.yml", DEPLOY / "compose" / "cpu.yml"):
        for name, service in load_compose(path)["services"].items():
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            out[f"{path.name}:{name}"] = {k: v for k, v in env.items() if k.startswith("JANUS_")}
    return out


def _dockerfile_environments() -> dict[str, dict[str, str]]:
    out, stage = {}, None
    text = DOCKERFILE_TEXT.replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("FROM "):
            stage = line.split()[-1]
        elif line.startswith("ENV ") and stage:
            pairs = re.findall(r"(JANUS_[A-Z_]+)=(\S+)", line)
            out.setdefault(f"Dockerfile:{stage}", {}).update(pairs)
    return out


def _k8s_environments() -> dict[str, dict[str, str]]:
    out = {}
    for name in KUSTOMIZATIONS:
        objects = render(name)
        env: dict[str, str] = {}
        for config in by_kind(objects, "ConfigMap"):
            env.update(config.get("data", {}))
        for secret in by_kind(objects, "Secret"):
            env.update(secret.get("stringData", {}))
        for deployment in by_kind(objects, "Deployment"):
            for container in containers(deployment):
                env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        out[f"k8s:{name}"] = {k: v for k, v in env.items() if k.startswith("JANUS_")}
    return out


ENVIRONMENTS = {**_dockerfile_environments(), **_compose_environments(), **_k8s_environments()}


def test_environments_found():
    assert {"Dockerfile:cpu", "Dockerfile:cuda", "k8s:base", "k8s:cpu", "k8s:gpu"} <= set(ENVIRONMENTS)
    assert ENVIRONMENTS["k8s:base"]["JANUS_MODEL"]


@pytest.mark.parametrize("where", sorted(ENVIRONMENTS))
def test_variables_are_settings(where, monkeypatch):
    env = ENVIRONMENTS[where]
    unknown = {k for k in env if k.removeprefix("JANUS_").lower() not in FIELDS}
    assert unknown == set(), f"{where}: not settings: {sorted(unknown)}"
    for key in list(os.environ):
        if key.startswith("JANUS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if "${" not in value:  # compose interpolation is resolved at `docker compose up`
            monkeypatch.setenv(key, value)
    Settings()  # raises on a value of the wrong type or outside a Literal


def test_compose_flags_are_settings():
    for name, service in load_compose(REPO / "docker-compose.yml")["services"].items():
        command = service.get("command") or []
        if name in {"api", "worker"}:
            flags = [part[2:].replace("-", "_") for part in command if part.startswith("--")]
            assert flags and set(flags) <= FIELDS, f"{name}: {flags}"
