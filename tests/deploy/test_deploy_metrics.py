"""deploy/metrics.txt and the Grafana dashboard: the catalogue is well formed, and every metric, label
and suffix the dashboard's PromQL uses exists in it (and every catalogued metric is on the dashboard)."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.deploy import DEPLOY, load_metric_catalog

DASHBOARD = DEPLOY / "grafana" / "janus-dashboard.json"
TYPES = {"counter", "gauge", "histogram"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Metric names DESIGN.md promises (plus GPU memory, added for the dashboard).
EXPECTED = {
    "janus_requests_total",
    "janus_request_duration_seconds",
    "janus_queue_depth",
    "janus_queue_wait_seconds",
    "janus_batch_size",
    "janus_running_requests",
    "janus_images_generated_total",
    "janus_prompt_tokens_total",
    "janus_generated_tokens_total",
    "janus_time_to_first_token_seconds",
    "janus_decode_step_seconds",
    "janus_worker_heartbeat_timestamp_seconds",
    "janus_redeliveries_total",
    "janus_dead_letters_total",
    "janus_resubmissions_total",
    "janus_worker_restarts_total",
    "janus_gpu_memory_used_bytes",
    "janus_kv_cache_usage_ratio",
    "janus_kv_cache_blocks",
    "janus_kv_cache_capacity_tokens",
    "janus_preemptions_total",
    "janus_rate_limited_total",
    "janus_webhook_deliveries_total",
    "janus_request_phase_seconds",
}

_NAME = re.compile(r"(?<![A-Za-z0-9_:])janus_[a-z0-9_]+")
_SELECTOR = re.compile(r"(janus_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# label_values() is Grafana's variable query, not PromQL: it takes a bare metric name.
_RANGE_FUNCTION = re.compile(r"\b(?:rate|irate|increase|label_values)\(\s*$")

Catalog = dict[str, tuple[str, tuple[str, ...]]]


def base_name(name: str, catalog: Catalog) -> str | None:
    """Catalogue entry a series name belongs to (histogram series map to their histogram)."""
    if name in catalog:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and catalog.get(stem, ("",))[0] == "histogram":
            return stem
    return None


def expr_problems(expr: str, catalog: Catalog, legend: str = "") -> list[str]:
    """What is wrong with one PromQL expression with respect to the catalogue."""
    problems: list[str] = []
    labels_in_expr: set[str] = set()
    for match in _NAME.finditer(expr):
        name = match.group(0)
        base = base_name(name, catalog)
        if base is None:
            problems.append(f"unknown metric {name}")
            continue
        kind, labels = catalog[base]
        labels_in_expr |= set(labels) | ({"le"} if name.endswith("_bucket") else set())
        before = expr[: match.start()]
        if kind == "histogram" and name == base:
            problems.append(f"{name} is a histogram: query {name}_bucket/_sum/_count")
        if (kind == "counter" or name.endswith(HISTOGRAM_SUFFIXES)) and not _RANGE_FUNCTION.search(before):
            problems.append(f"{name} is cumulative: wrap it in rate()/increase()")
    for name, matchers in _SELECTOR.findall(expr):
        base = base_name(name, catalog)
        if base is None:
            continue
        allowed = set(catalog[base][1]) | ({"le"} if name.endswith("_bucket") else set())
        problems += [f"{name} has no label {label}" for label in _MATCHER.findall(matchers) if label not in allowed]
    for group in _GROUPING.findall(expr):
        problems += [
            f"grouping by {label}, which no metric in the query has"
            for label in (g.strip() for g in group.split(","))
            if label and label not in labels_in_expr
        ]
    problems += [
        f"legend uses {label}, which no metric in the query has"
        for label in _LEGEND.findall(legend)
        if label not in labels_in_expr
    ]
    return problems


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))
    return out


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_metric_catalog()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def queries(dashboard) -> list[tuple[str, str, str]]:
    """(where, expr, legend) for every panel target and template-variable query."""
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"], target.get("legendFormat", "")))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            out.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query, ""))
    return out


def test_catalog_format(catalog):
    assert set(catalog) == EXPECTED
    for name, (kind, labels) in catalog.items():
        assert re.fullmatch(r"janus_[a-z0-9_]+", name), name
        assert kind in TYPES, f"{name}: type {kind}"
        assert (kind == "counter") == name.endswith("_total"), f"{name}: counters, and only counters, end in _total"
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", label) and label != "le" for label in labels), name


def test_catalog_parser_rejects_bad_lines(tmp_path):
    bad = tmp_path / "metrics.txt"
    bad.write_text("janus_x gauge a b extra\n")
    with pytest.raises(ValueError, match="name type"):
        load_metric_catalog(bad)


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    panels = _panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']} has no queries"
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_dashboard_queries_only_catalogued_metrics(queries, catalog):
    problems = [f"{where}: {p}" for where, expr, legend in queries for p in expr_problems(expr, catalog, legend)]
    assert problems == []


def test_every_catalogued_metric_is_on_the_dashboard(queries, catalog):
    used = {base_name(m, catalog) for _, expr, _ in queries for m in _NAME.findall(expr)}
    assert set(catalog) - used == set()


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(janus_nope_total[5m]))", "unknown metric janus_nope_total"),
        ('janus_queue_depth{kind="x"}', "janus_queue_depth has no label kind"),
        ("rate(janus_batch_size[5m])", "janus_batch_size is a histogram"),
        ("sum(janus_requests_total)", "janus_requests_total is cumulative"),
        ("sum by (worker) (janus_queue_depth)", "grouping by worker"),
        ("histogram_quantile(0.9, sum by (le) (rate(janus_batch_sizes_bucket[5m])))", "unknown metric"),
    ],
)
def test_expr_checker_catches_mistakes(expr, problem, catalog):
    assert any(problem in p for p in expr_problems(expr, catalog)), expr_problems(expr, catalog)


def test_expr_checker_accepts_good_queries(catalog):
    good = 'histogram_quantile(0.95, sum by (le, kind) (rate(janus_decode_step_seconds_bucket{kind="generate"}[5m])))'
    assert expr_problems(good, catalog, "{{kind}}") == []


def test_catalog_matches_the_server_registry(catalog):
    """deploy/metrics.txt is what server.metrics actually registers (names, types, labels)."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.metrics import Metrics

    registered = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus_client keeps counters' names without `_total` and adds it on export
            name = metric._name + ("_total" if metric._type == "counter" else "")
            registered[name] = (metric._type, tuple(metric._labelnames))
    assert registered == catalog
