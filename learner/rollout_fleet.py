"""The rollout workers as one fleet: start, resize, broadcast adapters, run tasks with retries.

Tasks are handed out dynamically (a worker gets the next task when it finishes one), so faster or
more workers simply take more. A worker that dies mid-task is restarted by Ray (`max_restarts`); its
constructor pulls the current adapter from the learner, and its unfinished task is handed to the
fleet again. Tasks are deterministic in their seed, so a re-run produces the same group (same id).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError

from learner.config import Config
from rollout_workers.tasks import GroupSummary, RolloutTask
from rollout_workers.worker import RolloutWorker

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Member:
    name: str
    handle: "ray.actor.ActorHandle"
    draining: bool = False
    busy: dict = field(default_factory=dict)  # future -> task


class RolloutFleet:
    def __init__(
        self,
        config: Config,
        reward_server: "ray.actor.ActorHandle",
        store_url: str,
        adapter_source: "ray.actor.ActorHandle | None",
        num_workers: int,
        max_restarts: int = 3,
        max_attempts: int = 3,
        worker_cls: type = RolloutWorker,
        worker_options: dict | None = None,
    ) -> None:
        self.config = config
        self.reward_server = reward_server
        self.store_url = store_url
        self.adapter_source = adapter_source
        self.max_attempts = max_attempts
        rollout = config.rollout
        self._remote = ray.remote(worker_cls).options(
            num_cpus=rollout.num_cpus_per_worker,
            num_gpus=rollout.num_gpus_per_worker,
            max_restarts=max_restarts,
            max_task_retries=0,
            **(worker_options or {}),
        )
        self._names = itertools.count()
        self.members: list[_Member] = []
        self.failures = 0
        self.resize(num_workers)

    # ------------------------------------------------------------------ membership
    def _start(self) -> _Member:
        name = f"rollout-{next(self._names)}"
        torch_threads = max(1, int(self.config.rollout.num_cpus_per_worker))
        handle = self._remote.remote(
            self.config.model_dump(mode="json"), name, self.reward_server, self.store_url, self.adapter_source, torch_threads
        )
        return _Member(name, handle)

    def resize(self, num_workers: int, wait: bool = True) -> None:
        """Grow (new workers pull the current adapter as they start) or shrink (idle workers go at
        once, busy ones after their current task)."""
        if num_workers < 1:
            raise ValueError(f"the fleet needs at least one rollout worker, got {num_workers}")
        active = [m for m in self.members if not m.draining]
        fresh = [self._start() for _ in range(num_workers - len(active))]
        self.members.extend(fresh)
        for member in sorted(active, key=lambda m: len(m.busy))[: max(0, len(active) - num_workers)]:
            member.draining = True
        self._retire_idle()
        if wait and fresh:
            ray.get([m.handle.info.remote() for m in fresh])
        log.info("rollout fleet at %d workers", self.size)

    @property
    def size(self) -> int:
        return sum(not m.draining for m in self.members)

    def _retire_idle(self) -> None:
        for member in [m for m in self.members if m.draining and not m.busy]:
            ray.kill(member.handle, no_restart=True)
            self.members.remove(member)

    def handles(self) -> list:
        return [m.handle for m in self.members if not m.draining]

    # ------------------------------------------------------------------ broadcast
    def broadcast(self, version: int, adapter_ref: ray.ObjectRef) -> None:
        """Every worker loads adapter `version` (passed by reference: fetched once per node)."""
        ray.get([h.set_adapter.remote(version, adapter_ref) for h in self.handles()])

    # ------------------------------------------------------------------ work
    def run(self, tasks: list[RolloutTask], in_flight_per_worker: int = 1) -> list[GroupSummary]:
        """Run every task to completion (retrying those whose worker died); summaries in task order."""
        pending = deque((task, 0) for task in tasks)
        results: dict[str, GroupSummary] = {}
        order = [t.group_id for t in tasks]
        attempts: dict[str, int] = {}
        while pending or any(m.busy for m in self.members):
            for member in [m for m in self.members if not m.draining]:
                while pending and len(member.busy) < in_flight_per_worker:
                    task, tries = pending.popleft()
                    attempts[task.group_id] = tries + 1
                    member.busy[member.handle.produce.remote(task)] = task
            futures = {f: m for m in self.members for f in m.busy}
            if not futures:
                raise RuntimeError("rollout tasks remain but the fleet has no worker")
            ready, _ = ray.wait(list(futures), num_returns=1, timeout=1.0)
            for future in ready:
                member = futures[future]
                task = member.busy.pop(future)
                try:
                    results[task.group_id] = ray.get(future)
                except (RayActorError, RayTaskError) as err:
                    self.failures += 1
                    tries = attempts[task.group_id]
                    if tries >= self.max_attempts:
                        raise RuntimeError(f"group {task.group_id} failed {tries} times; last error: {err}") from err
                    log.warning("rollout of %s failed on %s (%s); retrying", task.group_id, member.name, type(err).__name__)
                    pending.append((task, tries))
                    if isinstance(err, RayActorError):
                        time.sleep(0.1)  # Ray is restarting the actor; its next call waits for it
            self._retire_idle()
        return [results[g] for g in order]
