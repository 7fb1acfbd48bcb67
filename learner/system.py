"""The running system behind the driver: Ray, the replay store, the reward pool, the learner actor and
the rollout fleet, with one method per step of the training loop.

The driver (`learner.main`) owns the control flow and calls these; every actor owns its resources;
only small typed summaries and object references pass through the driver.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from learner.config import Config
from learner.learner_actor import Learner
from learner.metrics import ProjectMetrics
from learner.rollout_fleet import RolloutFleet
from replay import URL_ENV as REPLAY_URL_ENV, open_store
from reward_service.server import RewardServer
from rollout_workers.tasks import EvalResult, GroupSummary, RolloutTask

log = logging.getLogger(__name__)


def init_ray(num_cpus_needed: float) -> None:
    """Attach to the cluster RAY_ADDRESS names (as inside `ray job submit`), else start a local one
    with enough CPU slots for every actor (oversubscribing a small machine on purpose)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=max(int(np.ceil(num_cpus_needed)), os.cpu_count() or 1), include_dashboard=False)


@dataclass
class System:
    config: Config
    output: Path
    store_url: str
    reward_server: "ray.actor.ActorHandle"
    learner: "ray.actor.ActorHandle"
    fleet: RolloutFleet
    metrics: ProjectMetrics
    version: int = 0
    timings: dict = field(default_factory=dict)

    @classmethod
    def start(cls, config: Config, output: Path) -> System:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        rollout, reward = config.rollout, config.reward
        init_ray(rollout.num_workers * rollout.num_cpus_per_worker + reward.num_actors + 1)
        store_url = config.replay.url or os.environ.get(REPLAY_URL_ENV) or (output / "replay").resolve().as_uri()
        store = open_store(store_url, max_queue_len=config.replay.max_queue_groups)
        store.close()
        reward_server = ray.remote(RewardServer).options(max_concurrency=64, num_cpus=0).remote(
            [(reward.model, reward.options)],
            num_actors=reward.num_actors,
            batch_size=reward.batch_size,
            num_gpus=reward.num_gpus_per_actor,
            timeout_s=reward.timeout_s,
            resources=reward.resources or None,
        )
        learner = (
            ray.remote(Learner)
            .options(num_cpus=1, num_gpus=config.run.learner_num_gpus, resources=config.run.learner_resources or None)
            .remote(config.model_dump(mode="json"), store_url, str(output / "checkpoints"))
        )
        ray.get(learner.publish.remote())
        fleet = RolloutFleet(config, reward_server, store_url, learner, rollout.num_workers)
        metrics = ProjectMetrics()
        metrics.set_rollout_workers(fleet.size)
        metrics.set_reward_actors(ray.get(reward_server.num_actors.remote()))
        return cls(config, output, store_url, reward_server, learner, fleet, metrics)

    # ------------------------------------------------------------------ the loop's steps
    def rollout(self, tasks: list[RolloutTask]) -> list[GroupSummary]:
        t0 = time.perf_counter()
        summaries = self.fleet.run(tasks)
        self.timings["rollout_s"] = time.perf_counter() - t0
        self.timings["reward_s"] = sum(s.reward_s for s in summaries) / max(1, self.fleet.size)
        self.metrics.observe_phase("rollout", self.timings["rollout_s"])
        self.metrics.observe_phase("reward", self.timings["reward_s"])
        for s in summaries:
            self.metrics.count_groups_produced(worker=s.worker)
            if not s.stored:
                self.metrics.count_groups_dropped(reason=s.drop_reason.split(" ")[0] or "unknown")
        return summaries

    def update_on_policy(self, num_groups: int) -> dict:
        stats = ray.get(self.learner.train_on_policy.remote(num_groups, self.config.reward.timeout_s))
        return self._after_update(stats)

    def update_from_buffer(self, num_groups: int) -> dict:
        return self._after_update(ray.get(self.learner.train_from_buffer.remote(num_groups)))

    def _after_update(self, stats: dict) -> dict:
        self.version = stats["policy_version"]
        self.timings["update_s"] = stats["update_s"]
        self.metrics.observe_phase("update", stats["update_s"])
        self.metrics.count_groups_consumed(stats["groups"])
        self.metrics.count_groups_applied(stats["groups"] - stats["groups_without_signal"])
        return stats

    def broadcast(self) -> None:
        t0 = time.perf_counter()
        version, nbytes = ray.get(self.learner.publish.remote())
        _, ref = ray.get(self.learner.current_adapter.remote())
        self.fleet.broadcast(version, ref)
        self.timings["broadcast_s"] = time.perf_counter() - t0
        self.metrics.observe_phase("broadcast", self.timings["broadcast_s"])
        self.metrics.count_broadcast_bytes(nbytes * self.fleet.size)

    def evaluate(self, prompts: list[str], seeds: list[int], keep_frames: int = 0) -> tuple[list[EvalResult], list]:
        """Held-out scores of the current policy, the (prompt, seed) pairs spread over the workers."""
        handles = self.fleet.handles()
        parts = [list(range(i, len(prompts), len(handles))) for i in range(len(handles))]
        futures = [
            h.evaluate.remote([prompts[j] for j in part], [seeds[j] for j in part], keep_frames if i == 0 else 0)
            for i, (h, part) in enumerate(zip(handles, parts))
            if part
        ]
        results, frames = [], []
        for res, fr in ray.get(futures):
            results.extend(res)
            frames.extend(fr)
        return results, frames

    def fill_reference_buffer(self, tasks: list[RolloutTask]) -> int:
        """Semi-on-policy: collect the reference groups (the adapter is still at version 0, which is
        the reference policy exactly: LoRA B starts at zero) or import an exported buffer."""
        store = open_store(self.store_url)
        try:
            if self.config.replay.import_buffer is not None:
                added = store.import_buffer(self.config.replay.import_buffer)
                log.info("imported %d reference groups from %s", added, self.config.replay.import_buffer)
            missing = tasks[store.buffer_size():]  # a resumed collection continues where it stopped
            if missing:
                if self.version != 0:
                    raise RuntimeError("reference groups must come from version 0 (the reference policy)")
                self.rollout(missing)
            if self.config.replay.export_buffer:
                store.export_buffer(self.output / "reference_buffer")
            return store.buffer_size()
        finally:
            store.close()

    def checkpoint(self, driver_state: dict) -> str:
        return ray.get(self.learner.save_checkpoint.remote(driver_state))

    def restore(self) -> dict:
        state = ray.get(self.learner.restore_latest.remote())
        self.version = int(state["policy_version"])
        self.broadcast()
        return state

    def replay_stats(self) -> dict:
        store = open_store(self.store_url)
        try:
            return store.stats().model_dump()
        finally:
            store.close()

    def shutdown(self) -> None:
        for handle in self.fleet.handles():
            ray.kill(handle, no_restart=True)
        ray.get(self.reward_server.shutdown.remote())
        ray.kill(self.reward_server, no_restart=True)
        ray.kill(self.learner, no_restart=True)
