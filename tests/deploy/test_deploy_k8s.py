"""deploy/k8s: every kustomization renders, every object is schema-valid, and the objects agree with
each other (selectors, named ports, references, probes, GPU requests, KEDA trigger, settings)."""

from __future__ import annotations

import fnmatch
import re
from urllib.parse import urlsplit

import pytest

from tests.support.deploy import (
    KUSTOMIZATIONS,
    UnsupportedKustomization,
    by_kind,
    containers,
    find,
    k8s_bytes,
    kubectl_kustomize,
    pod_specs,
    redis_bytes,
    redis_options,
    render,
    render_kustomization,
    schema_errors,
    selects,
    split_image,
    strategic_merge,
)

ALL = list(KUSTOMIZATIONS)
WITH_GPU = ["base", "gpu"]
STARTUP_BUDGET_S = 20 * 60
# What each process writes, besides what its env points at (below): these must be volumes.
WRITABLE = {"janus-api": ["/tmp"], "janus-worker": ["/tmp"], "janus-redis": ["/data"]}
# Env vars naming directories a process writes to (caches, temp files); HF_HOME only where the weights
# are downloaded (the api reads the shared ConfigMap too but never loads a model).
WRITABLE_ENV = ("TMPDIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")
LOADS_MODELS = {"janus-worker"}
# All that KEDA's redis-streams scaler and its client send: the handshake, INFO (the lag trigger checks
# the server version first), XINFO GROUPS (lag), XLEN (lag before the group exists), XPENDING.
KEDA_READ_COMMANDS = {"hello", "auth", "ping", "select", "info", "xinfo|groups", "xlen", "xpending"}


def _key(obj):
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def _port_names(obj) -> set[str]:
    return {p["name"] for c in containers(obj) for p in c.get("ports", []) if "name" in p}


def _config(objects) -> dict[str, str]:
    return find(objects, "ConfigMap", "janus-config")["data"]


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _gibibytes(quantity: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def _probe_seconds(probe) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _environment(objects, container) -> dict[str, str]:
    """The literal environment of a container: its ConfigMaps (envFrom) and `env` values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _secret_keys(objects, container) -> set[tuple[str, str]]:
    """(Secret, key) pairs a container reads its environment from."""
    keys = set()
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            secret = find(objects, "Secret", source["secretRef"]["name"])
            keys |= {(secret["metadata"]["name"], key) for key in secret.get("stringData", {})}
    return keys


def _redis_script(objects) -> tuple[dict, str]:
    (container,) = containers(find(objects, "Deployment", "janus-redis"))
    assert container["command"] == ["sh", "-c"]
    return container, " ".join(container["args"])


def _env_from_secret(container, variable: str) -> tuple[str, str]:
    (entry,) = [e for e in container.get("env", []) if e["name"] == variable]
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


# ------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", ALL)
def test_renders_without_duplicates(name):
    objects = render(name)
    keys = [_key(o) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects in {name}"
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"} <= {o["kind"] for o in objects}


@pytest.mark.parametrize("name", ALL)
def test_lite_renderer_agrees_with_kubectl(name):
    real = kubectl_kustomize(KUSTOMIZATIONS[name])
    if real is None:
        pytest.skip("kubectl not installed; the tests use the built-in renderer alone")
    lite = render_kustomization(KUSTOMIZATIONS[name])
    assert {_key(o): o for o in lite} == {_key(o): o for o in real}


def test_lite_renderer_refuses_unknown_features(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(UnsupportedKustomization, match="namePrefix"):
        render_kustomization(tmp_path)


def test_strategic_merge_semantics():
    base = {
        "spec": {
            "containers": [
                {"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}]},
                {"name": "b", "image": "y"},
            ],
            "tolerations": [{"key": "t"}],
            "keep": 1,
        }
    }
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "L", "value": "2"}]}], "tolerations": None}}
    assert strategic_merge(base, patch) == {
        "spec": {
            "containers": [
                {"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}]},
                {"name": "b", "image": "y"},
            ],
            "keep": 1,
        }
    }


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ALL)
def test_objects_match_schemas(name):
    errors = [error for obj in render(name) for error in schema_errors(obj)]
    assert errors == []


def test_schema_validation_catches_mistakes():
    deployment = find(render("base"), "Deployment", "janus-api")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert any("livenesProbe" in e for e in schema_errors(deployment))

    scaled = find(render("base"), "ScaledObject", "janus-worker")
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 8  # KEDA wants strings
    assert schema_errors(scaled)

    monitor = find(render("base"), "ServiceMonitor", "janus-api")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert schema_errors(monitor)

    assert schema_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


# ---------------------------------------------------------------------------- cross-references
@pytest.mark.parametrize("name", ALL)
def test_services_select_pods_and_named_ports(name):
    objects = render(name)
    workloads = by_kind(objects, "Deployment")
    for service in by_kind(objects, "Service"):
        selected = [
            w for w in workloads if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert all(target in _port_names(w) for w in selected), (service["metadata"]["name"], target)


@pytest.mark.parametrize("name", ALL)
def test_deployment_selectors_match_templates(name):
    for deployment in by_kind(render(name), "Deployment"):
        assert selects(
            deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
        ), deployment["metadata"]["name"]


@pytest.mark.parametrize("name", ALL)
def test_probes_use_declared_ports(name):
    for obj in by_kind(render(name), "Deployment"):
        for container in containers(obj):
            names = {p["name"] for p in container.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {})
                port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
                if isinstance(port, str):
                    assert port in names, (obj["metadata"]["name"], kind, port)


@pytest.mark.parametrize("name", ALL)
def test_references_exist(name):
    objects = render(name)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for obj in by_kind(objects, "Deployment"):
        for container in containers(obj):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in find(objects, "Secret", ref["name"]).get("stringData", {}), ref
        for spec in pod_specs(obj):
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    for auth in by_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in find(objects, "Secret", ref["name"]).get("stringData", {}), ref
    for monitor in by_kind(objects, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            if "authorization" in endpoint:
                ref = endpoint["authorization"]["credentials"]
                assert ref["key"] in find(objects, "Secret", ref["name"]).get("stringData", {}), ref
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) in names
    for scaled in by_kind(objects, "ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        assert (ref.get("kind", "Deployment"), ref["name"]) in names


@pytest.mark.parametrize("name", ALL)
def test_disruption_budgets_select_deployments(name):
    objects = render(name)
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objects, "Deployment")]
    budgets = by_kind(objects, "PodDisruptionBudget")
    assert {b["metadata"]["name"] for b in budgets} >= {"janus-api"}
    for budget in budgets:
        assert any(selects(budget["spec"]["selector"]["matchLabels"], t) for t in templates)


@pytest.mark.parametrize("name", ALL)
def test_service_monitors_scrape_api_and_worker(name):
    objects = render(name)
    monitors = by_kind(objects, "ServiceMonitor")
    if name == "cpu":
        assert monitors == [], "the CPU try-out must not need the Prometheus Operator"
        return
    scraped = set()
    for monitor in monitors:
        services = [
            s
            for s in by_kind(objects, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            for service in services:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
                scraped.add(service["metadata"]["name"])
    assert scraped == {"janus-api", "janus-worker"}


# ------------------------------------------------------------------------------- api and worker
@pytest.mark.parametrize("name", ALL)
def test_api_probes_and_ports(name):
    objects = render(name)
    api = find(objects, "Deployment", "janus-api")
    (container,) = containers(api)
    assert container["args"][0] == "api"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = _config(objects)
    assert ports == {"http": int(config["JANUS_PORT"]), "grpc": int(config["JANUS_GRPC_PORT"])}
    assert "replicas" not in api["spec"], "the HPA owns the api replica count"
    hpa = find(objects, "HorizontalPodAutoscaler", "janus-api")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("name", ALL)
def test_worker_probes_sized_for_slow_model_loads(name):
    objects = render(name)
    (container,) = containers(find(objects, "Deployment", "janus-worker"))
    assert container["args"][0] == "worker"
    metrics_port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert metrics_port == int(_config(objects)["JANUS_METRICS_PORT"])
    # the worker's side server answers /health at once and /ready when the model is loaded
    assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert _probe_seconds(container["startupProbe"]) >= STARTUP_BUDGET_S
    # a slow decode step must not look like a hang
    assert _probe_seconds(container["livenessProbe"]) >= 60
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert _config(objects)["HF_HOME"] in mounts


@pytest.mark.parametrize("name", WITH_GPU)
def test_gpu_workers_request_one_gpu(name):
    objects = render(name)
    (container,) = containers(find(objects, "Deployment", "janus-worker"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _config(objects)["JANUS_DEVICE"] == "cuda"
    assert all(
        not split_image(c["image"])[1].endswith("-cpu")
        for d in by_kind(objects, "Deployment")
        for c in containers(d)
        if "janus-server" in c["image"]
    )


def test_cpu_overlay_is_cpu_only():
    objects = render("cpu")
    assert "nvidia.com/gpu" not in str(objects)
    assert _config(objects)["JANUS_DEVICE"] == "cpu"
    images = [
        c["image"]
        for d in by_kind(objects, "Deployment")
        for c in containers(d)
        if split_image(c["image"])[0] == "janus-server"
    ]
    assert len(images) == 1 and all(split_image(i)[1].endswith("-cpu") for i in images), "the worker's"
    assert by_kind(objects, "ScaledObject") == []
    (container,) = containers(find(objects, "Deployment", "janus-worker"))
    requests = container["resources"]["requests"]
    assert _cpu_cores(requests["cpu"]) <= 1 and _gibibytes(requests["memory"]) <= 4, "try-out requests stay tiny"
    pvc = find(objects, "PersistentVolumeClaim", "janus-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("name", ALL)
def test_api_runs_the_api_image(name):
    """The api Deployment runs the Dockerfile's `api` target (no torch), the same image on every cluster; the
    worker runs the full one. Both read the model name from one ConfigMap (the api lists it in /v1/models)."""
    objects = render(name)
    (api,) = containers(find(objects, "Deployment", "janus-api"))
    (worker,) = containers(find(objects, "Deployment", "janus-worker"))
    api_name, api_tag, _ = split_image(api["image"])
    worker_name, worker_tag, _ = split_image(worker["image"])
    assert (api_name, worker_name) == ("janus-server-api", "janus-server")
    assert api_tag and api_tag == worker_tag.removesuffix("-cpu"), "the api and the workers of one release"
    assert _environment(objects, api)["JANUS_MODEL"] == _environment(objects, worker)["JANUS_MODEL"]


@pytest.mark.parametrize("name", ALL)
def test_images_are_pinned(name):
    for obj in by_kind(render(name), "Deployment"):
        for container in containers(obj):
            _, tag, digest = split_image(container["image"])
            assert (tag and tag != "latest") or digest, container["image"]
            if tag and not digest and "janus-server" not in container["image"]:  # ours: the overlay's release tag
                assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{container['image']}: a moving tag"


@pytest.mark.parametrize("name", ALL)
def test_pods_run_as_non_root(name):
    for obj in by_kind(render(name), "Deployment"):
        (spec,) = pod_specs(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"].get("runAsUser", 1) != 0
        for container in containers(obj):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", ALL)
def test_pods_are_locked_down(name):
    for obj in by_kind(render(name), "Deployment"):
        (spec,) = pod_specs(obj)
        where = obj["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no pod here calls the Kubernetes API"
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in containers(obj):
            context = container["securityContext"]
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert not context.get("privileged"), where


@pytest.mark.parametrize("name", ALL)
def test_writable_paths_are_volumes(name):
    """With read-only images, every directory a process writes to must be a writable volume."""
    objects = render(name)
    worker_env = _environment(objects, containers(find(objects, "Deployment", "janus-worker"))[0])
    # torch.compile's caches default to $HOME (read-only) unless pointed elsewhere
    assert {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"} <= set(worker_env)
    for obj in by_kind(objects, "Deployment"):
        (spec,) = pod_specs(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(obj):
            env = _environment(objects, container)
            mounts = {
                m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", []) if not m.get("readOnly")
            }
            variables = WRITABLE_ENV + (("HF_HOME",) if obj["metadata"]["name"] in LOADS_MODELS else ())
            paths = WRITABLE[obj["metadata"]["name"]] + [env[k] for k in variables if k in env]
            for path in paths:
                hits = [volume for mount, volume in mounts.items() if path == mount or path.startswith(mount + "/")]
                assert hits, f"{obj['metadata']['name']}: {path} is not on a writable volume"
                assert {"emptyDir", "persistentVolumeClaim"} & set(hits[0]), (path, hits[0])


@pytest.mark.parametrize("name", ALL)
def test_redis_refuses_writes_before_its_memory_limit(name):
    container, script = _redis_script(render(name))
    options = redis_options(script)
    (maxmemory,) = options["maxmemory"]
    limit = k8s_bytes(container["resources"]["limits"]["memory"])
    # headroom for the AOF rewrite's copy-on-write, client buffers and fragmentation
    assert 0 < redis_bytes(maxmemory[0]) <= 0.8 * limit
    assert options["maxmemory-policy"] == [["noeviction"]]


@pytest.mark.parametrize("name", ALL)
def test_api_requires_a_key(name):
    objects = render(name)
    (container,) = containers(find(objects, "Deployment", "janus-api"))
    env = _environment(objects, container)
    assert env.get("JANUS_REQUIRE_API_KEY") == "true"
    assert ("janus-api-keys", "JANUS_API_KEY") in _secret_keys(objects, container)
    for flag in ("JANUS_OPEN_METRICS", "JANUS_OPEN_DOCS", "JANUS_OPEN_REFLECTION"):
        assert env.get(flag, "false") == "false", f"{flag}: the api port is open to every client"


@pytest.mark.parametrize("name", WITH_GPU)
def test_prometheus_sends_the_api_key(name):
    objects = render(name)
    (container,) = containers(find(objects, "Deployment", "janus-api"))
    (endpoint,) = find(objects, "ServiceMonitor", "janus-api")["spec"]["endpoints"]
    authorization = endpoint["authorization"]
    assert authorization["type"] == "Bearer"
    credentials = authorization["credentials"]
    assert (credentials["name"], credentials["key"]) in _secret_keys(objects, container)


# ---------------------------------------------------------------------------------- queue wiring
@pytest.mark.parametrize("name", ALL)
def test_queue_url_points_at_redis_service(name):
    objects = render(name)
    url = urlsplit(_config(objects)["JANUS_QUEUE"])
    assert url.scheme == "redis"
    service = find(objects, "Service", url.hostname)
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("name", WITH_GPU)
def test_keda_scales_workers_on_stream_length(name):
    objects = render(name)
    (scaled,) = by_kind(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "janus-worker"
    assert "replicas" not in find(objects, "Deployment", "janus-worker")["spec"], "KEDA owns the worker count"
    # zero workers -> API not ready -> no traffic -> no jobs -> never scales up again
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["stream"] == "janus:jobs"
    assert meta["consumerGroup"] == "janus-workers"
    # Not lagCount: fair dispatch delivers every waiting job to a holding consumer (the group's lag stays 0).
    assert int(meta["streamLength"]) >= 1
    assert "pendingEntriesCount" not in meta and "lagCount" not in meta
    host, _, port = meta["address"].rpartition(":")
    queue = urlsplit(_config(objects)["JANUS_QUEUE"])
    namespace = scaled["metadata"]["namespace"]
    assert host == f"{queue.hostname}.{namespace}.svc.cluster.local"
    assert int(port) == queue.port
    assert meta.get("databaseIndex", "0") == (queue.path.strip("/") or "0")


@pytest.mark.parametrize("name", WITH_GPU)
def test_keda_reads_redis_as_a_read_only_user(name):
    objects = render(name)
    (scaled,) = by_kind(objects, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"username", "password"}
    # never the queue password that the api and workers use
    queue_secrets = {
        name
        for deployment in by_kind(objects, "Deployment")
        for container in containers(deployment)
        for name, _ in _secret_keys(objects, container)
    }
    assert not {secret for secret, _ in refs.values()} & queue_secrets
    assert "janus-queue-auth" not in str(auth)

    # the user KEDA logs in as is the ACL user Redis defines, with the password from the same key
    container, script = _redis_script(objects)
    users = {values[0]: values[1:] for values in redis_options(script)["user"]}
    username = find(objects, "Secret", refs["username"][0])["stringData"][refs["username"][1]]
    assert username in users and username != "default"
    rules = users[username]
    (password_rule,) = [r for r in rules if r.startswith(">")]
    variable = password_rule[1:].strip("${}")
    assert _env_from_secret(container, variable) == refs["password"]
    assert "on" in rules and "nopass" not in rules

    # read-only: a few read commands, one read-only key pattern covering the stream, no channels
    commands = {r[1:].lower() for r in rules if r.startswith("+")}
    assert commands <= KEDA_READ_COMMANDS, f"not read-only: {commands - KEDA_READ_COMMANDS}"
    assert {"info", "xinfo|groups", "xlen"} <= commands, "what the lag trigger calls"
    assert not any(r.startswith("+@") or r.lower() in {"allcommands", "allkeys", "allchannels"} for r in rules)
    keys = [r for r in rules if "~" in r]
    assert keys and all(r.startswith("%R~") for r in keys), keys
    assert any(fnmatch.fnmatchcase(trigger["metadata"]["stream"], r[3:]) for r in keys)
    assert not any(r.startswith("&") for r in rules)


def test_cpu_overlay_has_no_keda_user():
    objects = render("cpu")
    assert by_kind(objects, "TriggerAuthentication") == []
    assert "janus-keda-redis" not in {s["metadata"]["name"] for s in by_kind(objects, "Secret")}
    container, _ = _redis_script(objects)
    (entry,) = [e for e in container["env"] if e["name"] == "KEDA_REDIS_PASSWORD"]
    assert entry["valueFrom"]["secretKeyRef"]["optional"] is True, "Redis must start without KEDA's Secret"
