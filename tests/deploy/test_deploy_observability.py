"""Prometheus scrape config, alert rules, PodMonitor and the Grafana dashboard use the exact names
controller/metrics.py makes Ray export (the live export itself is test_metrics_export.py)."""

from __future__ import annotations

import json
import re

import yaml
from deploy_files import DEPLOY, by_kind
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

from controller.metrics import METRICS

EXPORTED = {series for spec in METRICS.values() for series in spec.exported_series}
# Any identifier that names one of the project's metrics, with or without Ray's prefix.
NAME = re.compile(r"\b(?:ray_)?arcopo_[a-z0-9_]+\b")


def referenced_metrics(expr: str) -> set[str]:
    return set(NAME.findall(expr))


def check_expr(expr: str, where: str) -> set[str]:
    names = referenced_metrics(expr)
    assert names, f"{where}: no project metric in {expr!r}"
    unknown = names - EXPORTED
    assert not unknown, f"{where}: {sorted(unknown)} are not series controller/metrics.py exports"
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{where}: {expr!r}"
    return names


def test_names_check_catches_a_wrong_name():
    for wrong in ("arcopo_loss", "ray_arcopo_groups_applied_total_total", "ray_arcopo_reward"):
        try:
            check_expr(f"max({wrong})", "example")
        except AssertionError:
            continue
        raise AssertionError(f"{wrong} was accepted")


def test_prometheus_scrapes_the_file_ray_writes():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    [sd] = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/session_latest/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert config["rule_files"] == ["arcopo-rules.yml"]
    assert (DEPLOY / "prometheus" / "arcopo-rules.yml").is_file()


def test_alert_rules_use_exported_names_and_match_the_operator_copy():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "arcopo-rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert len(alerts) >= 4
    for rule in alerts:
        check_expr(rule["expr"], rule["alert"])
        assert rule["annotations"]["summary"]
    [(_, operator_rules)] = by_kind("PrometheusRule")
    assert operator_rules["spec"]["groups"] == rules["groups"]


def test_podmonitor_selects_the_ray_pods_metrics_port():
    [(_, monitor)] = by_kind("PodMonitor")
    [(_, cluster)] = by_kind("RayCluster")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    head_ports = {
        p["name"]: p["containerPort"]
        for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports["metrics"] == 8080
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_grafana_dashboard_covers_every_project_metric_by_its_exported_name():
    dashboard = json.loads((DEPLOY / "grafana" / "arcopo-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    seen: set[str] = set()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            seen |= check_expr(target["expr"], panel["title"])
    templating = {v["name"]: v for v in dashboard["templating"]["list"]}
    seen |= check_expr(templating["session"]["definition"], "session variable")
    for spec in METRICS.values():
        assert any(s in seen for s in spec.exported_series), f"{spec.name} has no panel"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "reward",
        "loss",
        "clip",
        "policy version",
        "groups",
        "queue",
        "phase",
        "workers",
        "actors",
    ):
        assert topic in titles, topic
