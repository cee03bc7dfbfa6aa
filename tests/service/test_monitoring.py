"""The Grafana dashboard and the Prometheus alerts use only metrics (and labels) the service
exposes, and docs/operations.md documents every metric and every scope."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gpuhub.service import scopes
from gpuhub.service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]

#: Metrics that come from elsewhere: Prometheus itself, and NVIDIA's dcgm-exporter.
EXTERNAL = {"up", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_PROF_GR_ENGINE_ACTIVE"}
SELECTOR = re.compile(r"\b((?:gpuhub|DCGM)_\w+|up)\b\s*(\{([^}]*)\})?")


def dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "config" / "grafana" / "gpuhub.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((ROOT / "config" / "prometheus" / "gpuhub-alerts.yaml").read_text())
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and rule["annotations"]["summary"], rule
            assert rule["labels"]["severity"] in ("warning", "critical")
            out.append(rule["expr"])
    return out


def label_names(metrics: Metrics) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for collector in metrics.registry._names_to_collectors.values():
        names = set(getattr(collector, "_labelnames", ()))
        for suffix in ("", "_total", "_bucket", "_sum", "_count"):
            out.setdefault(collector._name + suffix, set()).update(names)
        out[collector._name + "_bucket"].add("le")
    return out


def check(exprs: list[str]) -> set[str]:
    metrics = Metrics()
    exposed = metrics.names()
    labels = label_names(metrics)
    used = set()
    for expr in exprs:
        for name, _braces, matchers in SELECTOR.findall(expr):
            used.add(name)
            if name in EXTERNAL:
                continue
            assert name in exposed, f"{name} (in {expr!r}) is not a metric of the service"
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""):
                assert label in labels.get(name, set()), f"{name} has no label {label!r}"
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                owners = [n for n, _b, _m in SELECTOR.findall(expr) if n not in EXTERNAL]
                if owners:
                    assert any(label in labels.get(n, set()) for n in owners), (label, expr)
    return used


def test_dashboard_uses_only_exposed_metrics():
    used = check(dashboard_exprs())
    assert {"gpuhub_gpus_idle", "gpuhub_gpu_idle_seconds_total", "DCGM_FI_DEV_GPU_UTIL"} <= used


def test_alerts_use_only_exposed_metrics():
    used = check(alert_exprs())
    assert {"up", "gpuhub_snapshot_failures_total", "gpuhub_queue_wait_seconds"} <= used


def test_the_checks_catch_a_wrong_name():
    import pytest

    with pytest.raises(AssertionError, match="not a metric"):
        check(["rate(gpuhub_releases_totl[5m])"])
    with pytest.raises(AssertionError, match="no label"):
        check(['gpuhub_queue_length{queue="x"}'])


def test_operations_doc_lists_every_metric_and_scope():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for collector in Metrics().registry._names_to_collectors.values():
        name = collector._name
        shown = name + ("_total" if collector._type == "counter" else "")
        assert f"`{shown}`" in doc, f"docs/operations.md does not list {shown}"
    for scope in [*scopes.SCOPES, *scopes.LEGACY]:
        assert f"`{scope}`" in doc, f"docs/operations.md does not explain the scope {scope}"
