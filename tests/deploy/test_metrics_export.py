"""The project's metrics reach Prometheus: record on a live local Ray and scrape the node's endpoint.

Reliable set-up here: `include_dashboard=False` still starts the per-node dashboard agent, and that
agent is what serves `/metrics` on `_metrics_export_port`; the head's dashboard web server is not
needed (and is the slow, flaky part to start). `RAY_metrics_report_interval_ms=1000` makes processes
report every second and makes the agent forget an unrefreshed gauge after 2 s (20 s by default), so
the test can show, within its budget, that the facade keeps its gauges alive while a gauge set once
disappears.
"""

from __future__ import annotations

import math
import re
import socket
import time
import urllib.request

import pytest
import ray
from ray.util.metrics import Gauge

from controller.metrics import METRICS, ProjectMetrics

SCRAPE_TIMEOUT_S = 25.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(series name, labels without Ray's own): value} for our series only."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
    out = {}
    for line in text.splitlines():
        if not line.startswith("ray_arcopo_"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        assert m, f"unparsable Prometheus line: {line}"
        name, labels_text, value = m.groups()
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels_text or ""))
        kept = frozenset(
            (k, v) for k, v in labels.items() if k not in ray_labels and not k.startswith("otel_")
        )
        out[(name, kept)] = out.get((name, kept), 0.0) + float(value)
    return out


def _series(name: str, **labels: str) -> tuple[str, frozenset]:
    return (name, frozenset(labels.items()))


@ray.remote(num_cpus=0)
class _Producer:
    """Stands in for a rollout worker: the facade built inside an actor process."""

    def produce(self, worker: str, n: int) -> float:
        metrics = ProjectMetrics()
        metrics.count_groups_produced(worker=worker, n=n)
        return metrics.value("groups_produced_total", worker=worker)


@pytest.fixture
def local_ray(monkeypatch):
    assert not ray.is_initialized(), "this test starts its own Ray; another test left one running"
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    port = _free_port()
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port, log_to_driver=False)
    try:
        yield port
    finally:
        ray.shutdown()


def test_project_metrics_appear_in_prometheus_text(local_ray):
    port = local_ray
    # A gauge set once, not through the facade: Ray's agent drops it 2 report intervals later.
    Gauge("arcopo_test_unrefreshed", "control").set(1.0)
    control_set_at = time.monotonic()
    metrics = ProjectMetrics()
    metrics.record_iteration(
        iteration=3, policy_version=4, loss=-0.25, clip_fraction=0.125,
        reward_mean={"VQ": 1.5, "MQ": -0.5, "TA": math.nan},  # NaN: no sample at all, never a 0
    )
    metrics.count_groups_consumed(5)
    metrics.count_groups_applied(4)
    metrics.count_groups_dropped("stale", 1)
    metrics.count_groups_quarantined("nonfinite", 2)
    metrics.count_nonfinite_steps(3)
    metrics.set_replay_queue_length(7)
    metrics.set_rollout_workers(2)
    metrics.set_reward_actors(1)
    metrics.count_reward_requests(16)
    metrics.count_reward_invalid("nan_score", 2)
    metrics.count_replay_corrupt_records(1)
    metrics.count_broadcast_bytes(1024)
    metrics.observe_phase("rollout", 0.5)
    metrics.observe_phase("rollout", 2.0)
    metrics.observe_phase("update", 0.05)
    producer = _Producer.remote()
    assert ray.get(producer.produce.remote("rollout-7", 3)) == 3.0

    expected = {
        _series("ray_arcopo_iteration"): 3.0,
        _series("ray_arcopo_policy_version"): 4.0,
        _series("ray_arcopo_loss"): -0.25,
        _series("ray_arcopo_clip_fraction"): 0.125,
        _series("ray_arcopo_reward_mean", head="VQ"): 1.5,
        _series("ray_arcopo_reward_mean", head="MQ"): -0.5,
        _series("ray_arcopo_groups_produced_total", worker="rollout-7"): 3.0,
        _series("ray_arcopo_groups_consumed_total"): 5.0,
        _series("ray_arcopo_groups_applied_total"): 4.0,
        _series("ray_arcopo_groups_dropped_total", reason="stale"): 1.0,
        _series("ray_arcopo_groups_quarantined_total", reason="nonfinite"): 2.0,
        _series("ray_arcopo_nonfinite_steps_total"): 3.0,
        _series("ray_arcopo_replay_queue_length"): 7.0,
        _series("ray_arcopo_replay_corrupt_records_total"): 1.0,
        _series("ray_arcopo_rollout_workers"): 2.0,
        _series("ray_arcopo_reward_actors"): 1.0,
        _series("ray_arcopo_reward_requests_total"): 16.0,
        _series("ray_arcopo_reward_invalid_total", reason="nan_score"): 2.0,
        _series("ray_arcopo_broadcast_bytes_total"): 1024.0,
        _series("ray_arcopo_phase_seconds_count", phase="rollout"): 2.0,
        _series("ray_arcopo_phase_seconds_count", phase="update"): 1.0,
        # Cumulative buckets: 0.5 s falls in (0.3, 1], 2.0 s in (1, 3].
        _series("ray_arcopo_phase_seconds_bucket", phase="rollout", le="0.3"): 0.0,
        _series("ray_arcopo_phase_seconds_bucket", phase="rollout", le="1.0"): 1.0,
        _series("ray_arcopo_phase_seconds_bucket", phase="rollout", le="3.0"): 2.0,
        _series("ray_arcopo_phase_seconds_bucket", phase="rollout", le="+Inf"): 2.0,
    }
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        try:
            scraped = _scrape(port)
        except OSError:
            scraped = {}
        wrong = {k: (v, scraped.get(k)) for k, v in expected.items() if scraped.get(k) != v}
        if not wrong:
            break
        assert time.monotonic() < deadline, f"series missing or wrong after {SCRAPE_TIMEOUT_S}s: {wrong}"
        time.sleep(0.5)

    assert _series("ray_arcopo_reward_mean", head="TA") not in scraped  # Ray's exporter drops a NaN sample

    # Every series name the project defines is there, under the name the dashboards use.
    names = {name for name, _ in scraped}
    for spec in METRICS.values():
        assert set(spec.exported_series) <= names, spec.name

    # Past the agent's gauge lifetime (2 s here) the control gauge is gone; the facade's are not.
    time.sleep(max(0.0, control_set_at + 6.0 - time.monotonic()))
    later = _scrape(port)
    assert _series("ray_arcopo_test_unrefreshed") not in later
    for key in (_series("ray_arcopo_policy_version"), _series("ray_arcopo_reward_mean", head="VQ")):
        assert later.get(key) == expected[key], key
