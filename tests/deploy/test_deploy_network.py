"""deploy/k8s NetworkPolicies, evaluated: only the api and workers (and KEDA) reach Redis, only the
api is open to everyone, worker metrics only to the monitoring namespace, everything else dropped;
going out, the api and workers reach Redis and DNS, workers also HTTPS, Redis nothing.

`admits` and `sends` implement the parts of NetworkPolicy ingress and egress semantics the manifests
use (pod and namespace selectors with matchLabels / matchExpressions In, named and numbered ports,
protocols); the policies themselves are schema-checked with the other objects in test_deploy_k8s.py.
"""

from __future__ import annotations

import pytest

from tests.support.deploy import KUSTOMIZATIONS, by_kind, containers, render

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
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [_port_number(objects, to_pod, p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            if _any_peer(peers, from_namespace, from_pod):
                return True
    return False


def sends(objects, from_pod: dict[str, str], port: int, to_pod: dict[str, str] | None = None,
          to_namespace: str = NAMESPACE, protocol: str = "TCP") -> bool:
    """Would a pod of the janus namespace (labels) reach `to_pod` in `to_namespace` on `port`, or, with
    `to_pod` None, an address outside the cluster?"""
    policies = [p for p in by_kind(objects, "NetworkPolicy") if _matches(p["spec"]["podSelector"], from_pod)
                and "Egress" in p["spec"].get("policyTypes", [])]
    if not policies:
        return True  # not isolated
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            ports = rule.get("ports", [])
            assert not any("endPort" in p for p in ports), f"not evaluated here: {rule}"
            assert not any("ipBlock" in peer for peer in rule.get("to", [])), f"not evaluated here: {rule}"
            if ports and not any(
                p.get("protocol", "TCP") == protocol
                and (p["port"] == port or (to_pod is not None and _port_number(objects, to_pod, p["port"]) == port))
                for p in ports
            ):
                continue
            peers = rule.get("to")
            if peers is None:
                return True
            if to_pod is None:
                continue  # pod and namespace selectors never match an outside address
            if _any_peer(peers, to_namespace, to_pod):
                return True
    return False


def _any_peer(peers, namespace: str, pod: dict[str, str]) -> bool:
    """Does a rule's `from` / `to` list name a pod with labels `pod` in `namespace`?"""
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for peer in peers:
        in_namespace = ("namespaceSelector" not in peer and namespace == NAMESPACE) or _matches(
            peer.get("namespaceSelector"), namespace_labels)
        if in_namespace and ("podSelector" not in peer or _matches(peer["podSelector"], pod)):
            return True
    return False


def _pod(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "janus", "app.kubernetes.io/component": component}


REDIS, API, WORKER = _pod("redis"), _pod("api"), _pod("worker")
STRANGER = {"app": "something-else"}
KUBE_DNS = {"k8s-app": "kube-dns"}


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
def test_every_pod_is_isolated_both_ways(name):
    objects = render(name)
    for deployment in by_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert not admits(objects, labels, 12345, STRANGER, "default"), deployment["metadata"]["name"]
        assert not sends(objects, labels, 12345, STRANGER, "default"), deployment["metadata"]["name"]
        assert not sends(objects, labels, 12345), deployment["metadata"]["name"]


@pytest.mark.parametrize("name", ALL)
def test_no_default_passwords(name):
    objects = render(name)
    for secret in by_kind(objects, "Secret"):
        for key, value in secret.get("stringData", {}).items():
            if key != "username":  # a user name is no secret (KEDA's Redis user)
                assert value == "", f"Secret {secret['metadata']['name']} ships a value for {key}"
    redis = next(d for d in by_kind(objects, "Deployment") if d["spec"]["template"]["metadata"]["labels"] == REDIS)
    [container] = containers(redis)
    script = " ".join(container["args"])
    assert "--requirepass" in script and "exit 1" in script  # no password: Redis does not start
    assert "--appendonly yes" in script and "--appendfsync everysec" in script


@pytest.mark.parametrize("name", ALL)
def test_api_and_workers_reach_redis_and_dns(name):
    objects = render(name)
    for pod in (API, WORKER):
        assert sends(objects, pod, 6379, REDIS)
        assert sends(objects, pod, 53, KUBE_DNS, "kube-system", protocol="UDP")
        assert sends(objects, pod, 53, KUBE_DNS, "kube-system", protocol="TCP")
        assert not sends(objects, pod, 53, STRANGER, "kube-system", protocol="UDP")
        assert not sends(objects, pod, 6379, STRANGER, NAMESPACE)  # another Redis in the namespace
        assert not sends(objects, pod, 12345, STRANGER, "default")
    assert not sends(objects, API, 9100, WORKER)


@pytest.mark.parametrize("name", ALL)
def test_only_workers_go_out_and_only_to_https(name):
    objects = render(name)
    assert sends(objects, WORKER, 443)  # the model hub
    for port in (80, 22, 6379):
        assert not sends(objects, WORKER, port)
    for port in (443, 80):
        assert not sends(objects, API, port)


@pytest.mark.parametrize("name", ALL)
def test_redis_sends_nothing(name):
    objects = render(name)
    assert not sends(objects, REDIS, 443)
    assert not sends(objects, REDIS, 53, KUBE_DNS, "kube-system", protocol="UDP")
    assert not sends(objects, REDIS, 8000, API)
