"""In-process counters of the reward pool, as a plain dict the learner exports as it likes."""

from __future__ import annotations

import copy
import threading
from collections import Counter

from reward_service.result import RewardResult
from reward_service.scoring import reason_kind


class PoolMetrics:
    """Counters and latency sums, safe to update from several threads.

    `snapshot()` returns:
      requests, samples, valid_samples, invalid_samples {reason kind: count},
      batches (dispatches, retries included), batches_retried, batch_timeouts, batches_failed,
      actor_failures, actors_replaced, actors (current pool size),
      request_latency_s and batch_latency_s {count, sum, max, last}.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._invalid: Counter[str] = Counter()
        self._latency = {"request_latency_s": _latency(), "batch_latency_s": _latency()}
        self._actors = 0

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counts[name] += value

    def set_actors(self, count: int) -> None:
        with self._lock:
            self._actors = count

    def observe(self, which: str, seconds: float) -> None:
        with self._lock:
            entry = self._latency[which]
            entry["count"] += 1
            entry["sum"] += seconds
            entry["max"] = max(entry["max"], seconds)
            entry["last"] = seconds

    def record_results(self, results: list[RewardResult]) -> None:
        with self._lock:
            for result in results:
                if result.valid:
                    self._counts["valid_samples"] += 1
                else:
                    self._invalid[reason_kind(result.reason or "")] += 1

    def snapshot(self) -> dict:
        with self._lock:
            names = (
                "requests", "samples", "valid_samples", "batches", "batches_retried", "batch_timeouts",
                "batches_failed", "actor_failures", "actors_replaced",
            )
            out: dict = {name: self._counts[name] for name in names}
            out["invalid_samples"] = dict(self._invalid)
            out["actors"] = self._actors
            out.update(copy.deepcopy(self._latency))
            return out


def _latency() -> dict[str, float]:
    return {"count": 0, "sum": 0.0, "max": 0.0, "last": 0.0}
