"""The metrics facade without Ray: names, what it keeps, and the errors it gives."""

from __future__ import annotations

import math

import pytest
import ray

from controller.metrics import METRICS, PHASES, MetricsUnavailable, ProjectMetrics

# The names the issue fixes, with their kinds and labels; everything downstream (Grafana, alerts)
# depends on these exact strings.
EXPECTED = {
    "arcopo_iteration": ("gauge", ()),
    "arcopo_policy_version": ("gauge", ()),
    "arcopo_reward_mean": ("gauge", ("head",)),
    "arcopo_loss": ("gauge", ()),
    "arcopo_clip_fraction": ("gauge", ()),
    "arcopo_groups_produced_total": ("counter", ("worker",)),
    "arcopo_groups_consumed_total": ("counter", ()),
    "arcopo_groups_applied_total": ("counter", ()),
    "arcopo_groups_dropped_total": ("counter", ("reason",)),
    "arcopo_groups_quarantined_total": ("counter", ("reason",)),
    "arcopo_nonfinite_steps_total": ("counter", ()),
    "arcopo_replay_queue_length": ("gauge", ()),
    "arcopo_replay_corrupt_records_total": ("counter", ()),
    "arcopo_phase_seconds": ("histogram", ("phase",)),
    "arcopo_rollout_workers": ("gauge", ()),
    "arcopo_reward_actors": ("gauge", ()),
    "arcopo_reward_requests_total": ("counter", ()),
    "arcopo_reward_invalid_total": ("counter", ("reason",)),
    "arcopo_broadcast_bytes_total": ("counter", ()),
}


def test_metric_definitions_match_the_contract():
    assert {n: (s.kind, s.tag_keys) for n, s in METRICS.items()} == EXPECTED
    assert PHASES == ("rollout", "reward", "update", "broadcast")
    assert METRICS["arcopo_loss"].exported_series == ("ray_arcopo_loss",)
    assert METRICS["arcopo_groups_applied_total"].exported_series == ("ray_arcopo_groups_applied_total",)
    assert METRICS["arcopo_phase_seconds"].exported_series == (
        "ray_arcopo_phase_seconds_bucket",
        "ray_arcopo_phase_seconds_sum",
        "ray_arcopo_phase_seconds_count",
    )


def test_disabled_facade_keeps_values_without_ray():
    assert not ray.is_initialized()
    m = ProjectMetrics(enabled=False)
    m.record_iteration(iteration=2, policy_version=3, loss=0.5, clip_fraction=0.0, reward_mean={"VQ": 1.0})
    m.record_iteration(
        iteration=3, policy_version=4, loss=float("nan"), clip_fraction=0.25, reward_mean={"VQ": 2.0}
    )
    m.count_groups_produced("w0", 2)
    m.count_groups_produced("w0")
    m.count_groups_produced("w1", 0)  # nothing happened: no series
    m.count_groups_dropped("stale")
    with m.time_phase("update"):
        pass
    with pytest.raises(RuntimeError):
        with m.time_phase("rollout"):
            raise RuntimeError("a failed phase is still timed")

    assert m.value("iteration") == 3.0
    assert m.value("arcopo_policy_version") == 4.0
    assert math.isnan(m.value("loss"))
    assert m.value("reward_mean", head="VQ") == 2.0
    assert m.value("groups_produced_total", worker="w0") == 3.0
    assert m.value("groups_produced_total", worker="w1") is None
    assert m.value("groups_dropped_total", reason="stale") == 1.0
    assert m.value("phase_seconds", phase="update") == 1.0
    assert m.value("phase_seconds", phase="rollout") == 1.0
    assert "arcopo_groups_applied_total" not in m.snapshot()
    # Facades do not share what they recorded.
    assert ProjectMetrics(enabled=False).snapshot() == {}


def test_bad_input_is_named():
    m = ProjectMetrics(enabled=False)
    with pytest.raises(ValueError, match="phase must be one of"):
        m.observe_phase("decode", 1.0)
    with pytest.raises(ValueError, match="phase must be one of"):
        with m.time_phase("decode"):
            pass
    with pytest.raises(ValueError, match="phase seconds must be >= 0"):
        m.observe_phase("reward", -1.0)
    with pytest.raises(ValueError, match="groups_applied_total can only grow"):
        m.count_groups_applied(-1)
    with pytest.raises(ValueError, match="label 'reason'"):
        m.count_groups_dropped("")
    with pytest.raises(ValueError, match="label 'head'"):
        m.record_iteration(iteration=0, policy_version=0, loss=0, clip_fraction=0, reward_mean={None: 1.0})
    with pytest.raises(TypeError, match="loss must be a number"):
        m.record_iteration(iteration=0, policy_version=0, loss="low", clip_fraction=0, reward_mean={})
    with pytest.raises(KeyError, match="unknown metric"):
        m.value("rewards")


def test_enabled_facade_refuses_to_drop_data_without_ray():
    assert not ray.is_initialized()
    with pytest.raises(MetricsUnavailable, match="enabled=False"):
        ProjectMetrics().count_groups_applied()
