"""deploy/k8s NetworkPolicies, evaluated: only the api and workers (and KEDA) reach Redis, only the
api is open to everyone, worker metrics only to the monitoring namespace, everything else dropped.

`admits` implements the parts of NetworkPolicy ingress semantics the manifests use (pod and
namespace selectors with matchLabels / matchExpressions In, named and numbered ports); the
policies themselves are schema-checked with the other objects in test_deploy_k8s.py.
"""

from __future__ import annotations

import pytest

from .helpers import KUSTOMIZATIONS, by_kind, containers, render

ALL = list(KUSTOMIZATIONS)
NAMESPACE = "janus"


def _matches(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", f"not evaluated here: {expr}"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _port_number(objects, pod_labels: dict[str, str], port) -> int:
    if isinstance(port, int):
        return port
    for deployment in by_kind(objects, "Deployment"):
        if deployment["spec"]["template"]["metadata"]["labels"] == pod_labels:
            for container in containers(deployment):
                for p in container.get("ports", []):
                    if p.get("name") == port:
                        return p["containerPort"]
    raise AssertionError(f"no container port named {port!r} on pods {pod_labels}")


def admits(objects, to_pod: dict[str, str], port: int, from_pod: dict[str, str], from_namespace: str) -> bool:
    """Would traffic from a pod (labels, namespace) reach `to_pod` (in the janus namespace) on `port`?"""
    policies = [p for p in by_kind(objects, "NetworkPolicy") if _matches(p["spec"]["podSelector"], to_pod)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True  # not isolated
    namespace_labels = {"kubernetes.io/metadata.name": from_namespace}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [_port_number(objects, to_pod, p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                in_namespace = ("namespaceSelector" not in peer and from_namespace == NAMESPACE) or _matches(
                    peer.get("namespaceSelector"), namespace_labels)
                pod_ok = "podSelector" not in peer or _matches(peer["podSelector"], from_pod)
                if in_namespace and pod_ok:
                    return True
    return False


def _pod(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "janus", "app.kubernetes.io/component": component}


REDIS, API, WORKER = _pod("redis"), _pod("api"), _pod("worker")
STRANGER = {"app": "something-else"}


@pytest.mark.parametrize("name", ALL)
def test_only_api_and_workers_reach_redis(name):
    objects = render(name)
    assert admits(objects, REDIS, 6379, API, NAMESPACE)
    assert admits(objects, REDIS, 6379, WORKER, NAMESPACE)
    assert admits(objects, REDIS, 6379, {"app": "keda-operator"}, "keda")  # reads the stream's lag
    assert not admits(objects, REDIS, 6379, STRANGER, NAMESPACE)
    assert not admits(objects, REDIS, 6379, API, "default")  # same labels, other namespace
    assert not admits(objects, REDIS, 6379, STRANGER, "monitoring")


@pytest.mark.parametrize("name", ALL)
def test_only_the_api_is_exposed_and_metrics_go_to_monitoring(name):
    objects = render(name)
    for port in (8000, 50051):
        assert admits(objects, API, port, STRANGER, "ingress-nginx")
    assert not admits(objects, API, 9999, STRANGER, "ingress-nginx")
    assert admits(objects, WORKER, 9100, {"app.kubernetes.io/name": "prometheus"}, "monitoring")
    assert not admits(objects, WORKER, 9100, STRANGER, "default")
    assert not admits(objects, WORKER, 9100, API, NAMESPACE)


@pytest.mark.parametrize("name", ALL)
def test_every_pod_is_isolated(name):
    objects = render(name)
    for deployment in by_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert not admits(objects, labels, 12345, STRANGER, "default"), deployment["metadata"]["name"]


@pytest.mark.parametrize("name", ALL)
def test_no_default_passwords(name):
    objects = render(name)
    for secret in by_kind(objects, "Secret"):
        for key, value in secret.get("stringData", {}).items():
            assert value == "", f"Secret {secret['metadata']['name']} ships a value for {key}"
    redis = next(d for d in by_kind(objects, "Deployment") if d["spec"]["template"]["metadata"]["labels"] == REDIS)
    [container] = containers(redis)
    script = " ".join(container["args"])
    assert "--requirepass" in script and "exit 1" in script  # no password: Redis does not start
    assert "--appendonly yes" in script and "--appendfsync everysec" in script
