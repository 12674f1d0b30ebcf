"""docker-compose.yml, its CPU override, and the Prometheus / Grafana files it mounts: services, GPU
reservation, that every scrape target and datasource URL names a real service and port, and what a
default `docker compose up` exposes (loopback ports, required keys and passwords, no anonymous Grafana)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.deploy import (
    DEPLOY,
    REPO,
    compose_default,
    docker_bytes,
    load_compose,
    redis_bytes,
    redis_options,
    split_image,
)

COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = DEPLOY / "compose" / "cpu.yml"
WORKER_METRICS_DEFAULT = 9100
REQUIRED = re.compile(r"^\$\{(\w+):\?.+\}$")  # ${VAR:?message}: compose refuses to start without VAR


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def _container_ports(service: dict) -> set[int]:
    """Ports a service listens on inside the compose network (published or exposed)."""
    ports = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
    return ports | {int(p) for p in service.get("expose", [])}


def _worker_metrics_port(worker: dict) -> int:
    return int(_flag(worker["command"], "--metrics-port") or WORKER_METRICS_DEFAULT)


def _bind_mounts(service: dict) -> dict[str, str]:
    """{container path: repository-relative host path} for ./ bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = source[2:]
    return mounts


def test_services(services):
    assert set(services) == {"redis", "api", "worker", "prometheus", "grafana"}


def test_images_pinned(services):
    for name, service in services.items():
        image, tag, _ = split_image(service["image"].replace("${JANUS_IMAGE_TAG:-0.1.0}", "0.1.0"))
        assert tag and tag != "latest", f"{name}: image {service['image']} not pinned"
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: image {service['image']} has a moving tag"
    assert services["redis"]["image"] == "redis:7.4.6-alpine"
    assert services["worker"]["build"] == {"context": ".", "target": "cuda"}
    assert services["api"]["build"] == {"context": ".", "target": "api"}


def test_api_runs_the_api_image(services):
    """The api has no worker in its container: it runs the Dockerfile's `api` target (no torch), under an image
    name of its own, and names the worker's model (what /v1/models lists and OpenAI requests may say)."""
    api, worker = services["api"], services["worker"]
    assert split_image(api["image"])[0] == "janus-server-api"
    assert split_image(worker["image"])[0] == "janus-server"
    assert re.search(r"^FROM \S+ AS api$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert compose_default(api["environment"]["JANUS_MODEL"]) == compose_default(_flag(worker["command"], "--model"))


def test_api_and_worker_share_the_redis_queue(services):
    api, worker = services["api"]["command"], services["worker"]["command"]
    assert api[0] == "api" and worker[0] == "worker"
    queue = _flag(api, "--queue")
    assert queue == _flag(worker, "--queue")
    url = urlsplit(queue)
    assert url.scheme == "redis" and url.hostname in services
    assert url.hostname == "redis" and url.port == 6379
    assert _flag(worker, "--model"), "worker needs --model"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def _published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, as with nothing set."""
    out = []
    for port in service.get("ports", []):
        assert isinstance(port, str), f"use the short syntax: {port}"
        address, host, container = compose_default(port).split(":")
        out.append((address, int(host), int(container)))
    return out


def test_api_publishes_rest_and_grpc(services):
    assert {(8000, 8000), (50051, 50051)} <= {(h, c) for _, h, c in _published(services["api"])}


@pytest.mark.parametrize("path", [COMPOSE, CPU_OVERRIDE])
def test_published_ports_bind_loopback_by_default(path):
    for name, service in load_compose(path)["services"].items():
        for address, host, _ in _published(service):
            assert address == "127.0.0.1", f"{path.name}: {name} publishes {host} on {address!r}"


def test_api_requires_a_key(services):
    env = services["api"]["environment"]
    match = REQUIRED.match(env["JANUS_API_KEY"])
    assert match and match.group(1) == "JANUS_API_KEY"
    assert env["JANUS_REQUIRE_API_KEY"] == "true"
    for flag in ("JANUS_OPEN_METRICS", "JANUS_OPEN_DOCS", "JANUS_OPEN_REFLECTION"):
        assert env.get(flag, "false") == "false", flag


def test_redis_refuses_writes_before_its_memory_limit(services):
    redis = services["redis"]
    assert redis["command"][:2] == ["sh", "-c"]
    options = redis_options(compose_default(redis["command"][2]))
    limit = redis.get("mem_limit") or redis["deploy"]["resources"]["limits"]["memory"]
    (maxmemory,) = options["maxmemory"]
    assert 0 < redis_bytes(maxmemory[0]) <= 0.8 * docker_bytes(limit)
    assert options["maxmemory-policy"] == [["noeviction"]]
    assert REQUIRED.match(redis["environment"]["REDISCLI_AUTH"])
    assert options["requirepass"] == [["$REDISCLI_AUTH"]]


def test_worker_reserves_a_gpu_and_caches_models(compose, services):
    worker = services["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") == 1 or device.get("device_ids")
    volumes = dict(v.split(":")[:2][::-1] for v in worker["volumes"])
    assert volumes["/models"] == "models" and "models" in compose["volumes"]
    assert worker["environment"]["JANUS_DEVICE"] == "cuda"


def test_worker_healthcheck_uses_metrics_port(services):
    worker = services["worker"]
    check = " ".join(worker["healthcheck"]["test"])
    assert f":{_worker_metrics_port(worker)}/health" in check
    assert str(_worker_metrics_port(worker)) in {str(p) for p in worker["expose"]}


def test_prometheus_scrapes_api_and_workers(services):
    mounts = _bind_mounts(services["prometheus"])
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert config_path == "deploy/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / config_path).read_text())
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port)))
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            targets |= {(name, int(sd["port"])) for name in sd["names"]}
        assert job.get("metrics_path", "/metrics") == "/metrics"
    for host, port in targets - {("localhost", 9090)}:
        assert host in services, f"scrape target {host}:{port} is not a compose service"
        assert port in _container_ports(services[host]), f"{host} does not listen on {port}"
    assert ("api", 8000) in targets
    assert ("worker", _worker_metrics_port(services["worker"])) in targets


def test_prometheus_sends_the_api_key(compose, services):
    """The api's /metrics wants the key: Prometheus reads it from a secret holding JANUS_API_KEY."""
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "janus-api"]
    assert job["authorization"]["type"] == "Bearer"
    path = job["authorization"]["credentials_file"]
    mounted = {f"/run/secrets/{m.get('target', m['source'])}": m for m in services["prometheus"]["secrets"]}
    assert path in mounted
    assert mounted[path]["mode"] & 0o004, "Prometheus runs as nobody: the file must be readable to it"
    assert compose["secrets"][mounted[path]["source"]] == {"environment": "JANUS_API_KEY"}


def test_grafana_requires_login(services):
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert not {k for k in env if k.startswith("GF_AUTH_ANONYMOUS_")} - {"GF_AUTH_ANONYMOUS_ENABLED"}
    assert env.get("GF_USERS_ALLOW_SIGN_UP", "false") == "false"
    assert REQUIRED.match(env["GF_SECURITY_ADMIN_PASSWORD"]), "no default admin password"
    assert "/etc/grafana/grafana.ini" not in _bind_mounts(grafana), "settings come from GF_* here"
    for path in (REPO / "deploy/grafana/provisioning").rglob("*.yml"):
        assert "anonymous" not in path.read_text().lower(), path


def test_grafana_provisioning(services):
    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    for target, source in mounts.items():
        assert (REPO / source).exists(), f"grafana mounts missing {source} at {target}"
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus"
    assert url.hostname == "prometheus" and url.port in _container_ports(services["prometheus"])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "janus.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"].rstrip("/")
    mounted = [t for t, s in mounts.items() if s == "deploy/grafana/janus-dashboard.json"]
    assert mounted and all(t.rsplit("/", 1)[0] == dashboards_dir for t in mounted)


def test_cpu_override():
    override = load_compose(CPU_OVERRIDE)["services"]
    # the api image has no torch and runs no model: the same one fronts CPU workers
    assert set(override) == {"worker"}
    assert override["worker"]["build"] == {"target": "cpu"}
    assert override["worker"]["image"].endswith("-cpu")
    assert override["worker"]["deploy"] == {"__tag__": "!reset", "value": {}}, "drop the GPU reservation"
    assert override["worker"]["environment"]["JANUS_DEVICE"] == "cpu"
