"""Scaling a running system: the rollout fleet and the reward pool follow the output directory's scale
request (`python -m learner.scale`, controller.scale); the learner is not touched."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from controller.metrics import ProjectMetrics
from controller.rollout_fleet import RolloutFleet
from controller.scale import ScaleRequest, ScaleRequestError, read_scale_request

log = logging.getLogger(__name__)


class Scaler:
    """Applies the scale request to the fleet and the reward server; a resize of the reward pool runs
    in the background (its actors may take long to start) and is collected on a later check."""

    def __init__(self, output: Path, fleet: RolloutFleet, reward_server: "ray.actor.ActorHandle", metrics: ProjectMetrics) -> None:
        self.output, self.fleet, self.reward_server, self.metrics = Path(output), fleet, reward_server, metrics
        self.reward_actors = ray.get(reward_server.num_actors.remote())
        self._checked_at = 0.0
        self._error = ""  # the last problem of the request file, logged once
        self._reward_resize: "ray.ObjectRef | None" = None
        self.record_sizes()

    def apply(self, min_interval_s: float = 1.0) -> None:
        """Resize to the request. Cheap: reads one small file at most once per `min_interval_s`."""
        now = time.monotonic()
        if now - self._checked_at < min_interval_s:
            return
        self._checked_at = now
        self._collect_reward_resize()
        request = self.read_request()
        if request is not None:
            if request.rollout_workers and request.rollout_workers != self.fleet.size:
                log.info("scaling rollout workers %d -> %d", self.fleet.size, request.rollout_workers)
                self.fleet.resize(request.rollout_workers, wait=False)
            if request.reward_actors and request.reward_actors != self.reward_actors and self._reward_resize is None:
                log.info("scaling reward actors %d -> %d", self.reward_actors, request.reward_actors)
                self._reward_resize = self.reward_server.resize.remote(request.reward_actors)
        self.record_sizes()

    def _collect_reward_resize(self) -> None:
        if self._reward_resize is not None and ray.wait([self._reward_resize], timeout=0)[0]:
            try:
                ray.get(self._reward_resize)
            except Exception as err:  # e.g. new reward actors could not start: keep running with the old ones
                log.error("resizing the reward pool failed: %s", err)
            self._reward_resize = None
        if self._reward_resize is None:  # asked each time: a restarted reward server starts at its first size
            self.reward_actors = ray.get(self.reward_server.num_actors.remote())

    def read_request(self) -> ScaleRequest | None:
        request, self._error = read_request(self.output, self._error)
        return request

    def record_sizes(self) -> None:
        self.metrics.set_rollout_workers(self.fleet.ready_size)
        self.metrics.set_reward_actors(self.reward_actors)


def read_request(output: Path, logged: str = "") -> tuple[ScaleRequest | None, str]:
    """The scale request (or None) and the problem of a broken file: logged unless it is `logged`
    already (a broken file is not fatal)."""
    try:
        return read_scale_request(output), logged
    except ScaleRequestError as err:
        if str(err) != logged:
            log.error("ignoring the scale request: %s", err)
        return None, str(err)
