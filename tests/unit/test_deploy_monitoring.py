"""The Prometheus Operator manifests: rules parse, name real metrics and labels, scrape real ports.

Alert rules drift silently: a renamed metric makes an alert that never
fires. So every selector in every rule is parsed (``promql-parser``) and
checked against the metrics the services register, label by label.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import grpc
import promql_parser
import pytest
from prometheus_client.metrics import MetricWrapperBase

import ranking_service.metrics
import recsys.experiments
import recsys.serving
import retrieval_service.metrics
from recsys.v1 import ranking_pb2, retrieval_pb2
from retrieval_service.engine import SourceStatus
from retrieval_service.servicer import MEMBER

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "k8s" / "monitoring"
OPERATIONS = REPO / "docs" / "operations.md"
SERVICES = {"ranking", "retrieval"}
# Series a family exposes, by metric type (prometheus_client's naming).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _load_renderer():
    spec = importlib.util.spec_from_file_location("deploy_render", REPO / "deploy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return _load_renderer().build(MONITORING)


def _exported() -> dict[str, set[str]]:
    """Series name -> label names, for every metric the services define."""
    out: dict[str, set[str]] = {}
    for module in (recsys.serving, recsys.experiments, ranking_service.metrics,
                   retrieval_service.metrics):  # fmt: skip
        for metric in vars(module).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = set(metric._labelnames)
            for suffix in SUFFIXES[metric._type]:
                out[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def _selectors(node: Any) -> list[Any]:
    """Every vector selector in a parsed PromQL expression."""
    if type(node).__name__ == "VectorSelector":
        return [node]
    found = []
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector", "args"):
        child = getattr(node, attr, None)
        for c in child if isinstance(child, list | tuple) else [child]:
            if c is not None and type(c).__module__.startswith("promql_parser"):
                found += _selectors(c)
    return found


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_objects_and_namespace(docs):
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule"]
    assert {d["metadata"]["namespace"] for d in docs} == {"recsys"}


def test_every_rule_is_complete_and_named_once(docs):
    rules = _rules(docs)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert r["alert"].startswith("Recsys"), r["alert"]
        assert r["labels"]["severity"] in {"page", "ticket"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_every_selector_names_an_exported_metric_and_its_labels(docs):
    exported = _exported()
    methods = {
        m.name
        for pb in (ranking_pb2, retrieval_pb2)
        for s in pb.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    } | {MEMBER}
    known_values = {
        "service": SERVICES,
        "method": methods,
        "code": {c.name for c in grpc.StatusCode},
        "status": {s.value for s in SourceStatus},
    }
    for rule in _rules(docs):
        selectors = _selectors(promql_parser.parse(rule["expr"]))
        assert selectors, rule["alert"]
        for sel in selectors:
            assert sel.name in exported, f"{rule['alert']}: {sel.name} is not exported"
            for m in sel.matchers.matchers:
                assert m.name in exported[sel.name], f"{rule['alert']}: {sel.name} has no {m.name}"
                allowed = known_values.get(m.name)
                if allowed is not None:
                    for value in m.value.split("|"):
                        assert value in allowed, f"{rule['alert']}: {m.name}={value!r}"


def test_every_alerted_metric_is_in_the_operations_guide(docs):
    guide = OPERATIONS.read_text()
    for rule in _rules(docs):
        for sel in _selectors(promql_parser.parse(rule["expr"])):
            family = sel.name.removesuffix("_bucket")
            assert family in guide, f"{rule['alert']}: {family} is not in operations.md"


def test_a_broken_expression_is_caught():
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (le (rate(recsys_rpc_total[5m]))")


def test_the_pod_monitor_scrapes_the_services_metrics_ports(docs):
    render = _load_renderer()
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    want = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    scraped = set()
    for doc in render.build(REPO / "deploy" / "k8s" / "overlays" / "cpu"):
        if doc["kind"] != "Deployment":
            continue
        template = doc["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        if all(labels.get(k) == v for k, v in want.items()):
            containers = template["spec"]["containers"]
            named = {p.get("name") for c in containers for p in c.get("ports", [])}
            if ports & named:
                scraped.add(labels["app.kubernetes.io/name"])
    assert scraped == SERVICES


def test_the_retrieval_outage_page_counts_retrievals_only(docs):
    """RecordInteraction is UNAVAILABLE while Redis is down and retrievals still answer:
    with every method on both sides, five failed records beside twenty good retrievals paged."""
    (rule,) = [r for r in _rules(docs) if r["alert"] == "RecsysRetrievalUnavailable"]
    rpc = [s for s in _selectors(promql_parser.parse(rule["expr"])) if s.name == "recsys_rpc_total"]
    assert len(rpc) == 2
    for sel in rpc:
        methods = [m for m in sel.matchers.matchers if m.name == "method"]
        assert len(methods) == 1, rule["expr"]
        (m,) = methods
        assert str(m.op) in {"MatchOp.Equal", "MatchOp.Re"}, m.op
        assert set(m.value.split("|")) == {"Retrieve", MEMBER}, m.value
