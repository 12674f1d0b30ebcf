"""Shared helpers for the deployment tests: repository paths, YAML loading, a kustomize renderer and
Kubernetes / CRD schema validation.

Nothing here needs a Docker engine, a cluster or the network. Kustomize output comes from
`kubectl kustomize` when kubectl is on PATH; otherwise from `render_kustomization`, a small renderer
for exactly the kustomize features deploy/k8s uses (it refuses anything else, so a kustomization that
outgrows it fails loudly instead of rendering wrong). When both exist, a test checks they agree.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "cpu": K8S / "overlays" / "cpu",
}
KUBERNETES_VERSION = "1.30"
SCHEMAS = REPO / "tests" / "deploy" / "schemas"

Obj = dict[str, Any]


# --------------------------------------------------------------------------------------------- YAML
class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Docker Compose's merge tags `!reset` and `!override`."""


def _tagged(tag: str):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            value: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return {"__tag__": tag, "value": value}

    return construct


ComposeLoader.add_constructor("!reset", _tagged("!reset"))
ComposeLoader.add_constructor("!override", _tagged("!override"))


def load_compose(path: Path) -> Obj:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def load_yaml_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose_default(value: str) -> str:
    """A compose value with every `${VAR:-default}` / `${VAR-default}` replaced by its default (what it
    becomes when VAR is unset) and `$$` unescaped; `${VAR:?message}` is left as it is."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    return value.replace("$$", "$")


# ------------------------------------------------------------------------------------------ sizes
_K8S_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_DOCKER_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_REDIS_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "k": 10**3, "m": 10**6, "g": 10**9}


def _size(text: str, units: dict[str, int], what: str) -> int:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text).strip())
    if not match or (match.group(2) and match.group(2) not in units):
        raise ValueError(f"not a {what} size: {text!r}")
    return int(match.group(1)) * units.get(match.group(2), 1)


def k8s_bytes(quantity: str) -> int:
    """Kubernetes memory quantity ('1Gi', '768Mi', '1G') -> bytes."""
    return _size(quantity, _K8S_UNITS, "Kubernetes")


def docker_bytes(size: str) -> int:
    """Compose mem_limit ('1g', '768m'; binary units) -> bytes."""
    return _size(str(size).lower(), _DOCKER_UNITS, "Docker")


def redis_bytes(size: str) -> int:
    """redis.conf memory size ('768mb' binary, '800m' decimal, plain bytes) -> bytes."""
    return _size(str(size).lower(), _REDIS_UNITS, "Redis")


# ------------------------------------------------------------------------------------ shell, Redis
def shell_words(script: str) -> list[str]:
    """Words of a `sh -c` script, quotes removed; operators (`;`, `||`, `>&`, ...) are words of their own."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def redis_options(script: str) -> dict[str, list[list[str]]]:
    """The `--name value ...` options a redis-server start script passes, by name, one list of values
    per occurrence. Options gathered with `set -- ...` and passed on as "$@" count as well."""
    options: dict[str, list[list[str]]] = {}
    current: list[str] | None = None
    for word in shell_words(script):
        if word.startswith("--") and len(word) > 2:
            current = options.setdefault(word[2:], [])
            current.append([])
        elif current is not None and word != "$@" and not set(word) <= set("();<>|&"):
            current[-1].append(word)
        else:
            current = None
    return options


# ---------------------------------------------------------------------------------------- metrics
def load_metric_catalog(path: Path = DEPLOY / "metrics.txt") -> dict[str, tuple[str, tuple[str, ...]]]:
    """deploy/metrics.txt -> {name: (type, labels)}. Raises ValueError on a malformed line."""
    catalog: dict[str, tuple[str, tuple[str, ...]]] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) not in (2, 3):
            raise ValueError(f"metrics.txt:{number}: want `name type [labels]`, got {raw!r}")
        name, kind = fields[0], fields[1]
        labels = tuple(fields[2].split(",")) if len(fields) == 3 else ()
        if name in catalog:
            raise ValueError(f"metrics.txt:{number}: {name} listed twice")
        catalog[name] = (kind, labels)
    return catalog


# ------------------------------------------------------------------------------------- kustomize
class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature render_kustomization does not implement."""


_SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}
# Strategic-merge keys of the lists our patches touch; any other list is replaced whole.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def render_kustomization(directory: Path) -> list[Obj]:
    """Render a kustomization directory with the subset of kustomize that deploy/k8s uses."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - _SUPPORTED_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    # 1. resources: files or nested kustomizations, in order
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += render_kustomization(path) if path.is_dir() else load_yaml_docs(path)
    # 2. patches (strategic merge, target taken from the patch itself)
    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise UnsupportedKustomization(f"{directory}: only `patches: - path: FILE` is supported: {entry}")
        for patch in load_yaml_docs(directory / entry["path"]):
            objects = _apply_patch(objects, patch, directory / entry["path"])
    # 3. namespace, labels, images
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for group in spec.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise UnsupportedKustomization(f"{directory}: labels with includeSelectors/includeTemplates")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(group["pairs"])
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


def _matches(obj: Obj, patch: Obj) -> bool:
    group = patch["apiVersion"].rpartition("/")[0]
    return (
        obj["kind"] == patch["kind"]
        and obj["metadata"]["name"] == patch["metadata"]["name"]
        and obj["apiVersion"].rpartition("/")[0] == group
    )


def _apply_patch(objects: list[Obj], patch: Obj, source: Path) -> list[Obj]:
    hits = [i for i, obj in enumerate(objects) if _matches(obj, patch)]
    if len(hits) != 1:
        raise ValueError(f"{source}: patch for {patch['kind']}/{patch['metadata']['name']} matches {len(hits)} objects")
    directive = patch.get("$patch")
    if directive == "delete":
        return [obj for i, obj in enumerate(objects) if i != hits[0]]
    if directive is not None:
        raise UnsupportedKustomization(f"{source}: $patch: {directive}")
    objects[hits[0]] = strategic_merge(objects[hits[0]], patch)
    return objects


def strategic_merge(base: Any, patch: Any) -> Any:
    """Strategic merge patch restricted to maps, `null` deletion and the lists in _MERGE_KEYS."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedKustomization(f"nested directive {key}")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, _MERGE_KEYS[key])
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[Obj], patch: list[Obj], key: str) -> list[Obj]:
    out = copy.deepcopy(base)
    for item in patch:
        index = next((i for i, old in enumerate(out) if old.get(key) == item[key]), None)
        if index is None:
            out.append(copy.deepcopy(item))
        else:
            out[index] = strategic_merge(out[index], item)
    return out


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/a/b:tag@sha256:..' -> ('reg:5000/a/b', 'tag', 'sha256:..')."""
    name, _, digest = image.partition("@")
    head, _, last = name.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        return (f"{head}/{last}" if head else last), tag, digest or None
    return name, None, digest or None


def pod_specs(obj: Obj) -> list[Obj]:
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    template = obj.get("spec", {}).get("template", {})
    return [template["spec"]] if "spec" in template else []


def containers(obj: Obj) -> list[Obj]:
    return [c for spec in pod_specs(obj) for c in spec.get("initContainers", []) + spec.get("containers", [])]


def _set_image(objects: list[Obj], image: Obj) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise UnsupportedKustomization(f"images entry {image}")
    for obj in objects:
        for container in containers(obj):
            name, tag, digest = split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            tag = image.get("newTag", tag)
            digest = image.get("digest", digest)
            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def kubectl_kustomize(directory: Path) -> list[Obj] | None:
    """The real kustomize (built into kubectl), or None when kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@functools.cache
def _render_cached(name: str) -> str:
    objects = kubectl_kustomize(KUSTOMIZATIONS[name])
    if objects is None:
        objects = render_kustomization(KUSTOMIZATIONS[name])
    return json.dumps(objects)


def render(name: str) -> list[Obj]:
    """Rendered objects of one of KUSTOMIZATIONS (a fresh copy each call)."""
    return json.loads(_render_cached(name))


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    hits = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(hits) == 1, f"want exactly one {kind}/{name}, found {len(hits)}"
    return hits[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------ validation
_CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
}


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / _CRD_SCHEMAS[(api_version, kind)]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(obj: Obj) -> list[str]:
    """Problems found validating one object: Kubernetes' own schemas (strict: unknown fields are errors)
    for built-in kinds, our minimal schemas for the CRDs we use, and an error for anything else."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    where = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
    if key in _CRD_SCHEMAS:
        validator = _crd_validator(*key)
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []
