"""The project's Prometheus metrics, defined once, and a small facade to record them.

Every metric is a `ray.util.metrics` instrument. Each node's Ray dashboard agent exports what the
processes on that node record, in Prometheus text on the node's metrics-export port
(`ray start --metrics-export-port`, 8080 under KubeRay). What Ray 2.60 puts there, checked live by
`tests/deploy/test_metrics_export.py`:

- every name gets the prefix `ray_`: the gauge `arcopo_loss` is the series `ray_arcopo_loss`;
- a counter is exported as a Prometheus counter whose name ends in `_total` (Ray appends it unless
  the name already ends so; ours all do, so `arcopo_groups_applied_total` is
  `ray_arcopo_groups_applied_total`);
- a histogram gives `<name>_bucket{le=...}`, `<name>_sum` and `<name>_count`. Ray rebuilds `_sum`
  from bucket midpoints, so a mean from `_sum / _count` is an estimate; bucket counts are exact.
- every series also carries Ray's own labels (`SessionName`, `NodeAddress`, `WorkerId`, ...), so
  dashboards aggregate with `sum by (...)` / `max by (...)`;
- a gauge set to NaN has no sample at all (Ray's exporter drops it; the previous value is not kept):
  the facade passes NaN through, so an iteration whose loss or reward is NaN leaves a gap, never a
  0.0. Skipped non-finite optimiser steps are counted in `nonfinite_steps_total`.

Ray's agent forgets a gauge two report intervals (20 s by default) after the process last set it,
and a process only reports a gauge when it is set. A gauge set once per iteration (minutes on GPUs)
would vanish from Prometheus between iterations, so the facade re-sets the last value of every gauge
it owns from one daemon thread per process, every half report interval.

Usage, in the driver or inside any Ray actor (instruments are created on first use):

    metrics = ProjectMetrics()
    metrics.count_groups_produced(worker="rollout-0")
    with metrics.time_phase("rollout"):
        ...

`ProjectMetrics(enabled=False)` records nothing to Ray and needs no Ray at all (unit tests, tools);
an enabled facade used without a running Ray raises `MetricsUnavailable` instead of dropping data.
Both keep what they recorded in `snapshot()` / `value(...)`, per facade instance.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

from learner.messages import UpdateStats

logger = logging.getLogger(__name__)

METRIC_PREFIX = "arcopo_"
RAY_EXPORT_PREFIX = "ray_"  # what Ray's Prometheus exporter puts in front of every custom metric

PHASES = ("rollout", "reward", "update", "broadcast")
# Seconds: the pocket world's phases take milliseconds, a 1.3B model's rollout minutes.
PHASE_BUCKETS_S = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the name given to ray.util.metrics
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        """The Prometheus metric family name on a Ray node's metrics endpoint."""
        base = RAY_EXPORT_PREFIX + self.name
        if self.kind == "counter" and not base.endswith("_total"):
            return base + "_total"
        return base

    @property
    def exported_series(self) -> tuple[str, ...]:
        """Every series name this metric produces in the Prometheus text."""
        if self.kind == "histogram":
            return tuple(self.exported_name + s for s in ("_bucket", "_sum", "_count"))
        return (self.exported_name,)


def _spec(name: str, kind: Kind, description: str, *tags: str, boundaries=()) -> MetricSpec:
    return MetricSpec(METRIC_PREFIX + name, kind, description, tuple(tags), tuple(boundaries))


METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        _spec("iteration", "gauge", "Training iteration the driver last finished"),
        _spec("policy_version", "gauge", "Adapter version of the learner's current policy"),
        _spec("reward_mean", "gauge", "Mean reward of the iteration's groups, per reward head", "head"),
        _spec("loss", "gauge", "Objective value of the iteration's last update"),
        _spec("clip_fraction", "gauge", "Fraction of ratio terms outside the clip range"),
        _spec("groups_produced_total", "counter", "Candidate groups a rollout worker finished", "worker"),
        _spec("groups_consumed_total", "counter", "Candidate groups the learner pulled from replay"),
        _spec("groups_applied_total", "counter", "Candidate groups used in an optimiser update"),
        _spec("groups_dropped_total", "counter", "Candidate groups discarded, by reason", "reason"),
        _spec("groups_quarantined_total", "counter",
              "Candidate groups the learner could not use, dead-lettered at its door, by reason", "reason"),
        _spec("nonfinite_steps_total", "counter", "Optimiser steps skipped: their loss or gradients were not finite"),
        _spec("replay_queue_length", "gauge", "Candidate groups waiting in the on-policy queue"),
        _spec("replay_corrupt_records_total", "counter", "Replay records rejected as corrupt"),
        _spec(
            "phase_seconds",
            "histogram",
            "Wall time of one iteration phase",
            "phase",
            boundaries=PHASE_BUCKETS_S,
        ),
        _spec("rollout_workers", "gauge", "Rollout workers alive"),
        _spec("reward_actors", "gauge", "Reward actors alive"),
        _spec("reward_requests_total", "counter", "Videos sent to the reward pool for scoring"),
        _spec(
            "reward_invalid_total", "counter", "Videos the reward pool could not score, by reason", "reason"
        ),
        _spec("broadcast_bytes_total", "counter", "Adapter bytes the learner published to rollout workers"),
    )
}


class MetricsUnavailable(RuntimeError):
    """An enabled ProjectMetrics was used where Ray is not running."""


TagKey = tuple[tuple[str, str], ...]


class _RayInstruments:
    """One set of Ray instruments per process, plus the thread that keeps its gauges alive."""

    _lock = threading.Lock()
    _instance: "_RayInstruments | None" = None

    def __init__(self, refresh_s: float | None):
        from ray.util import metrics as ray_metrics

        self._objects = {}
        for spec in METRICS.values():
            if spec.kind == "counter":
                obj = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "gauge":
                obj = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
            else:
                obj = ray_metrics.Histogram(
                    spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
                )
            self._objects[spec.name] = obj
        self.refresh_s = refresh_s  # None: follow the running Ray's report interval
        self._gauges: dict[tuple[str, TagKey], tuple[str, float]] = {}  # -> (Ray session, value)
        self._gauges_lock = threading.Lock()
        self._keeper = threading.Thread(target=self._keep_gauges, name="arcopo-metrics-gauges", daemon=True)
        self._keeper.start()

    @classmethod
    def get(cls, refresh_s: float | None) -> "_RayInstruments":
        import ray

        if not ray.is_initialized():
            raise MetricsUnavailable(
                "ProjectMetrics(enabled=True) records to Ray's metrics exporter, but Ray is not "
                "initialised in this process: call ray.init() first, or use ProjectMetrics(enabled=False)"
            )
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls(refresh_s)
            elif refresh_s is not None:
                cls._instance.refresh_s = refresh_s
            return cls._instance

    def inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._objects[name].inc(value, tags=tags or None)

    def observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._objects[name].observe(value, tags=tags or None)

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        session = _session_name()
        with self._gauges_lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = (session, value)
        self._objects[name].set(value, tags=tags or None)

    def _keep_gauges(self) -> None:
        import ray

        while True:
            # Re-read every round: a later ray.init() in this process may report at another interval.
            time.sleep(self.refresh_s if self.refresh_s is not None else _default_refresh_s())
            if not ray.is_initialized():
                continue
            session = _session_name()
            with self._gauges_lock:
                # A value set under an earlier ray.init() in this process does not belong to this run.
                self._gauges = {k: v for k, v in self._gauges.items() if v[0] == session}
                current = [(k, v[1]) for k, v in self._gauges.items()]
            for (name, tag_key), value in current:
                try:
                    self._objects[name].set(value, tags=dict(tag_key) or None)
                except Exception:  # the exporter is Ray's; a failed refresh must not kill the thread
                    logger.exception("re-publishing gauge %s failed", name)


def _session_name() -> str:
    import ray

    return ray.get_runtime_context().get_session_name()


def _default_refresh_s() -> float:
    """Half of Ray's report interval: the agent keeps a gauge for 2 * max(report interval, 1 s)."""
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 2000.0


def _label(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"metric label {name!r} must be a non-empty string, got {value!r}")
    return value


def _number(what: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}") from None


class ProjectMetrics:
    """Typed recording of the project's metrics; cheap enough to call on every group.

    `enabled=False` records only into this object (no Ray needed). `refresh_s` overrides how often
    this process re-publishes its gauges (default: half of Ray's metrics report interval).
    """

    def __init__(self, enabled: bool = True, *, refresh_s: float | None = None):
        self.enabled = enabled
        self._refresh_s = refresh_s
        self._values: dict[str, dict[TagKey, float]] = {name: {} for name in METRICS}
        self._lock = threading.Lock()

    # -- the driver and the learner ---------------------------------------------------------
    def record_iteration(
        self,
        *,
        iteration: int,
        policy_version: int,
        loss: float,
        clip_fraction: float,
        reward_mean: Mapping[str, float],
    ) -> None:
        """One finished iteration: its index, the policy version, the update's statistics and the
        mean reward per head (include a combined entry, e.g. "overall", if the run has one)."""
        values = {
            "iteration": _number("iteration", iteration),
            "policy_version": _number("policy_version", policy_version),
            "loss": _number("loss", loss),
            "clip_fraction": _number("clip_fraction", clip_fraction),
        }
        rewards = {
            _label("head", head): _number(f"reward_mean[{head}]", v) for head, v in reward_mean.items()
        }
        for short, value in values.items():
            self._set(short, value, {})
        for head, value in rewards.items():
            self._set("reward_mean", value, {"head": head})

    def set_policy_version(self, version: int) -> None:
        self._set("policy_version", version, {})

    def count_groups_consumed(self, n: float = 1) -> None:
        self._inc("groups_consumed_total", n, {})

    def count_groups_applied(self, n: float = 1) -> None:
        self._inc("groups_applied_total", n, {})

    def count_groups_dropped(self, reason: str, n: float = 1) -> None:
        self._inc("groups_dropped_total", n, {"reason": _label("reason", reason)})

    def count_groups_quarantined(self, reason: str, n: float = 1) -> None:
        self._inc("groups_quarantined_total", n, {"reason": _label("reason", reason)})

    def count_nonfinite_steps(self, n: float = 1) -> None:
        self._inc("nonfinite_steps_total", n, {})

    def record_update(self, stats: UpdateStats) -> None:
        """The group and step counters of one learner update (`Learner.train_*`'s statistics)."""
        self.count_groups_consumed(stats.groups)
        self.count_groups_applied(stats.groups - stats.groups_without_signal)
        for reason, n in stats.quarantined.items():
            self.count_groups_quarantined(reason, n)
        self.count_nonfinite_steps(stats.nonfinite_steps)

    def count_broadcast_bytes(self, nbytes: int) -> None:
        self._inc("broadcast_bytes_total", nbytes, {})

    def observe_phase(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        seconds = _number("phase seconds", seconds)
        if not seconds >= 0:
            raise ValueError(f"phase seconds must be >= 0, got {seconds}")
        self._record(METRIC_PREFIX + "phase_seconds", "histogram", seconds, {"phase": phase})

    @contextmanager
    def time_phase(self, phase: str) -> Iterator[None]:
        """Observe the wall time of the block as `phase` (also when the block raises)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_phase(phase, time.perf_counter() - start)

    # -- rollout workers, replay and the reward pool ------------------------------------------
    def count_groups_produced(self, worker: str, n: float = 1) -> None:
        self._inc("groups_produced_total", n, {"worker": _label("worker", worker)})

    def set_replay_queue_length(self, length: int) -> None:
        self._set("replay_queue_length", length, {})

    def count_replay_corrupt_records(self, n: float = 1) -> None:
        self._inc("replay_corrupt_records_total", n, {})

    def set_rollout_workers(self, count: int) -> None:
        self._set("rollout_workers", count, {})

    def set_reward_actors(self, count: int) -> None:
        self._set("reward_actors", count, {})

    def count_reward_requests(self, n: float = 1) -> None:
        self._inc("reward_requests_total", n, {})

    def count_reward_invalid(self, reason: str, n: float = 1) -> None:
        self._inc("reward_invalid_total", n, {"reason": _label("reason", reason)})

    # -- what this facade recorded ------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[TagKey, float]]:
        """Per metric and label set: a gauge's last value, a counter's total, a histogram's count."""
        with self._lock:
            return {name: dict(series) for name, series in self._values.items() if series}

    def value(self, name: str, **tags: str) -> float | None:
        """One entry of `snapshot()`; `name` with or without the `arcopo_` prefix."""
        full = name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name
        if full not in METRICS:
            raise KeyError(f"unknown metric {name!r}")
        with self._lock:
            return self._values[full].get(tuple(sorted(tags.items())))

    # -- internals ----------------------------------------------------------------------------
    def _instruments(self) -> _RayInstruments:
        # Checked on every call: after ray.shutdown() records would vanish without a word.
        return _RayInstruments.get(self._refresh_s)

    def _set(self, short: str, value, tags: dict[str, str]) -> None:
        self._record(METRIC_PREFIX + short, "gauge", _number(f"{short}", value), tags)

    def _inc(self, short: str, n, tags: dict[str, str]) -> None:
        n = _number(f"{short} increment", n)
        if not (n >= 0 and math.isfinite(n)):
            raise ValueError(f"{short} can only grow by a finite amount >= 0, got {n}")
        if n == 0:
            return  # nothing happened; Ray's counters refuse a zero increment
        self._record(METRIC_PREFIX + short, "counter", n, tags)

    def _record(self, name: str, kind: Kind, value: float, tags: dict[str, str]) -> None:
        if self.enabled:
            ray_side = self._instruments()
            if kind == "gauge":
                ray_side.set(name, value, tags)
            elif kind == "counter":
                ray_side.inc(name, value, tags)
            else:
                ray_side.observe(name, value, tags)
        key = tuple(sorted(tags.items()))
        with self._lock:
            series = self._values[name]
            if kind == "gauge":
                series[key] = value
            else:
                series[key] = series.get(key, 0.0) + (value if kind == "counter" else 1.0)
