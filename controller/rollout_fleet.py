"""The rollout workers as one fleet: start, resize, broadcast adapters, run tasks with retries.

Tasks are handed out dynamically (a ready worker gets the next task when it finishes one), so faster
or more workers simply take more. Tasks are deterministic in their seed, so a re-run produces the
same group under the same id, which the replay store and the learner apply at most once.

Work runs in the background of the driver's other calls: `submit` queues tasks, `pump` hands them out
and takes in what finished, `collect` pumps until the tasks it names are done (`run` = submit +
collect). With pipelining (`algorithm.max_policy_lag` >= 1) the system submits the next iteration's
tasks and pumps the fleet while the learner updates; `broadcast(wait=False)` then queues the new
adapter on each worker behind the group it is making, so it takes effect between groups. `abandon`
forgets every queued and unfinished task (the learner went back to an older checkpoint: those tasks
are asked for again, their late results are ignored; a group they pushed is applied at most once).

Membership changes while tasks run: `resize` starts workers without waiting for them (a worker
whose resources are not there yet, e.g. until the autoscaler adds a node, simply stays "starting"),
and a worker gets tasks once its constructor has returned, having pulled the current adapter from
the learner. Shrinking removes starting and idle workers at once and busy ones after their task.

Failures:
- a worker that dies mid-task is restarted by Ray (`max_restarts`; its constructor pulls the current
  adapter again); its task goes back to the queue. A worker whose restarts are spent, or whose
  constructor failed (e.g. while the learner itself was restarting), is replaced by a fresh one;
  `max_init_failures` constructor failures in a row (after growing pauses) stop the run: a config
  or checkpoint problem.
  A task that fails `max_attempts` times stops the run with the last error.
- a worker that cannot reach the replay store (`ReplayUnavailableError`, raised after the store's own
  bounded retries) does not use up its task's attempts: the fleet waits for the store to answer
  again, at most `store_outage_s`, then runs the task again; past that it raises
  `ReplayUnavailableError` saying for how long the store was gone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError

from actor_group import ActorGroup, Member, wait_any
from controller.config import Config
from replay import ReplayUnavailableError, StoreLostError, open_store
from rollout_workers.tasks import GroupSummary, RolloutTask, WorkerInfo
from rollout_workers.worker import RolloutWorker

log = logging.getLogger(__name__)

_PROBE_RETRY_S = 0.25


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
        worker_kwargs: dict | None = None,
        store_outage_s: float = 600.0,
        wait: bool = True,
    ) -> None:
        self.config = config
        self.reward_server = reward_server
        self.store_url = store_url
        self.adapter_source = adapter_source
        self.max_attempts = max_attempts
        self.store_outage_s = store_outage_s
        self.worker_kwargs = dict(worker_kwargs or {})
        rollout = config.rollout
        options = {
            "num_cpus": rollout.num_cpus_per_worker,
            "num_gpus": rollout.num_gpus_per_worker,
            "resources": dict(rollout.resources) or None,  # e.g. {"rollout_gpu": 1}: only rollout nodes
            "max_restarts": max_restarts,
            "max_task_retries": 0,
            **(worker_options or {}),
        }
        self._remote = ray.remote(worker_cls).options(**options)
        self.group = ActorGroup("rollout", self._start_worker, lambda handle: handle.info.remote())
        self.failures = 0  # tasks that failed and were handed out again
        self.store_waits = 0  # tasks that met an unreachable replay store
        self.init_failures = 0  # worker constructors failed in a row
        self._latest_adapter: tuple[int, ray.ObjectRef] | None = None
        self.max_init_failures = 5
        # The background work: tasks not handed out yet, attempts and results of every task asked for
        # (and not collected yet), and the adapter loads a non-waiting broadcast queued.
        self._pending: deque[RolloutTask] = deque()
        self._attempts: dict[str, int] = {}
        self._results: dict[str, GroupSummary] = {}
        self._adapter_loads: dict[ray.ObjectRef, tuple[Member, int]] = {}
        self.in_flight_per_worker = 1
        self.resize(num_workers, wait=wait)

    # ------------------------------------------------------------------ membership
    def _start_worker(self, name: str) -> "ray.actor.ActorHandle":
        torch_threads = max(1, int(self.config.rollout.num_cpus_per_worker))
        return self._remote.remote(
            self.config.worker_settings().model_dump(mode="json"), name, self.reward_server, self.store_url, self.adapter_source,
            torch_threads, **self.worker_kwargs,
        )

    def resize(self, num_workers: int, wait: bool = True) -> None:
        """Grow or shrink to `num_workers`. With `wait`, return once every new worker is ready;
        without, new workers join the running tasks as they become ready (e.g. when their node joins)."""
        if num_workers < 1:
            raise ValueError(f"the fleet needs at least one rollout worker, got {num_workers}")
        self.group.resize(num_workers)
        if wait:
            self.wait_ready()
        log.info("rollout fleet at %d workers (%d ready)", self.size, self.ready_size)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until no worker is starting or restarting (raises TimeoutError after `timeout_s`)."""
        def describe() -> str:
            starting = [m.name for m in self.group.members if m.starting]
            return f"rollout workers {starting} not ready after {timeout_s}s (no resources for them?)"

        self.group.settle(self._poll, timeout_s, 1.0, describe)

    @property
    def size(self) -> int:
        """Workers the fleet is meant to have (starting ones included, draining ones not)."""
        return sum(not m.draining for m in self.group.members)

    @property
    def ready_size(self) -> int:
        """Workers that take tasks now."""
        return sum(m.takes_work for m in self.group.members)

    @property
    def replaced(self) -> int:
        """Workers replaced after their restarts were spent (or holding a newer adapter)."""
        return self.group.replaced

    def handles(self) -> list:
        """Handles of the ready workers (the ones that take tasks now)."""
        return [m.handle for m in self.group.members if m.takes_work]

    def infos(self) -> list[WorkerInfo]:
        """What each ready worker says about itself (name, pid, adapter version, ...)."""
        return ray.get([h.info.remote() for h in self.handles()])

    def shutdown(self) -> None:
        """Kill every worker for good."""
        self.group.shutdown()

    # ------------------------------------------------------------------ broadcast
    def broadcast(self, version: int, adapter_ref: ray.ObjectRef, force: bool = False, wait: bool = True) -> None:
        """Every worker loads adapter `version` (passed by reference: fetched once per node).

        Starting workers get it once ready (if their constructor pulled an older one); a worker that
        dies meanwhile pulls the current adapter when Ray restarts it. After the learner was restored
        from an older checkpoint, `force` makes the workers take its (older) adapter; a worker that
        still keeps another version is replaced, so it starts from the learner's adapter.

        Without `wait` the load is queued on each worker behind the group it is making (a worker runs
        its calls in order) and its answer is taken in by `pump`: a busy fleet is not held up."""
        self._latest_adapter = (version, adapter_ref)  # what starting workers get once ready
        ready = [m for m in self.group.members if m.takes_work]
        futures = {m.handle.set_adapter.remote(version, adapter_ref, force): (m, version) for m in ready}
        if not wait:
            self._adapter_loads.update(futures)
            return
        for future, (member, _) in futures.items():
            held = self._load_answer(member, future, version)
            if held is not None and held != version:
                self._replace(member, f"it holds adapter version {held}, the learner's is {version}")

    def _adapter_loaded(self, ref: ray.ObjectRef) -> None:
        """Take in the answer of an adapter load a non-waiting broadcast queued."""
        member, version = self._adapter_loads.pop(ref)
        if member not in self.group.members:
            return  # replaced meanwhile
        held = self._load_answer(member, ref, version)
        if held is not None and held < version:  # a later broadcast's answer decides when it holds a newer one
            self._replace(member, f"it holds adapter version {held}, the learner's is {version}")

    def _load_answer(self, member: Member, ref: ray.ObjectRef, version: int) -> int | None:
        """The adapter version a worker holds after a load of `version`; None if the load failed (a dead
        worker reloads the adapter when restarted; a lost adapter comes again with the next broadcast)."""
        try:
            return ray.get(ref)
        except RayActorError as err:
            log.warning("broadcast to %s failed (%s); it reloads the adapter when restarted", member.name, type(err).__name__)
            self.group.reprobe(member)
        except ObjectLostError as err:
            _adapter_lost(member, version, err)
        return None

    def _replace(self, member: Member, why: str) -> None:
        """Replace `member`; the tasks it was making go back to the queue."""
        orphans = list(member.busy.values())
        member.busy.clear()
        self.group.replace(member, why)
        self._requeue(orphans)

    # ------------------------------------------------------------------ work
    @property
    def busy(self) -> bool:
        """Tasks asked for are still queued or being made."""
        return bool(self._pending) or any(t.group_id in self._attempts for m in self.group.members for t in m.busy.values())

    def run(
        self,
        tasks: list[RolloutTask],
        in_flight_per_worker: int = 1,
        on_tick: Callable[[], None] | None = None,
    ) -> list[GroupSummary]:
        """Run every task to completion (retrying those whose worker died); summaries in task order.

        `on_tick` is called about once a second (the driver applies scaling requests there)."""
        self.in_flight_per_worker = in_flight_per_worker
        return self.collect(tasks, on_tick)

    def submit(self, tasks: list[RolloutTask]) -> None:
        """Queue `tasks` (those asked for already, queued, running or done, are not asked for twice)."""
        for task in tasks:
            if task.group_id not in self._attempts:
                self._attempts[task.group_id] = 0
                self._pending.append(task)

    def collect(self, tasks: list[RolloutTask], on_tick: Callable[[], None] | None = None) -> list[GroupSummary]:
        """Submit `tasks` if not yet asked for, pump until every one is done; summaries in task order."""
        self.submit(tasks)
        while any(t.group_id not in self._results for t in tasks):
            if on_tick is not None:
                on_tick()
            self.pump(timeout=1.0)
        out = [self._results.pop(t.group_id) for t in tasks]
        for t in tasks:
            del self._attempts[t.group_id]
        return out

    def pump(self, timeout: float) -> None:
        """Hand out queued tasks and take in what finished, waiting at most `timeout` for it."""
        self._hand_out()
        if not self.group.members and self._pending:
            raise RuntimeError("rollout tasks remain but the fleet has no worker")
        self._poll(timeout)
        self.group.retire_idle()

    def abandon(self) -> int:
        """Forget every task asked for and not collected: queued ones are dropped, results of running
        ones ignored when they come. Returns how many were forgotten."""
        forgotten = len(self._attempts)
        self._pending.clear()
        self._attempts.clear()
        self._results.clear()
        return forgotten

    def _requeue(self, tasks: list[RolloutTask]) -> None:
        self._pending.extend(t for t in tasks if t.group_id in self._attempts and t.group_id not in self._results)

    def _hand_out(self) -> None:
        # Least recently given a task first, so every worker (a new one too) shares the work.
        for member in sorted(self.group.members, key=lambda m: m.last_work_at):
            while member.takes_work and self._pending and len(member.busy) < self.in_flight_per_worker:
                task = self._pending.popleft()
                self._attempts[task.group_id] += 1
                self.group.submit(member, member.handle.produce.remote(task), task)

    def _finished(self, member: Member, task: RolloutTask, outcome: object) -> None:
        if task.group_id not in self._attempts:
            return  # abandoned: its group (if it pushed one) is applied at most once like any other
        if isinstance(outcome, GroupSummary):
            self._results[task.group_id] = outcome
            return
        self._failed(member, task, outcome)
        self._pending.append(task)

    def _failed(self, member: Member, task: RolloutTask, error: Exception) -> None:
        """Account for a failed task before it is handed out again; raise if the run cannot go on."""
        attempts = self._attempts
        self.failures += 1
        if isinstance(error, StoreLostError):
            raise error  # the run's store lost its data: retrying the task cannot help
        if isinstance(error, ReplayUnavailableError):
            attempts[task.group_id] -= 1  # the store's outage, not the task's fault
            self.store_waits += 1
            log.warning("%s could not store %s: %s", member.name, task.group_id, error)
            self._await_store()
        elif attempts[task.group_id] >= self.max_attempts:
            raise RuntimeError(
                f"group {task.group_id} failed {attempts[task.group_id]} times; last error: {error}"
            ) from error
        else:
            log.warning("rollout of %s failed on %s (%s); retrying", task.group_id, member.name, type(error).__name__)

    def _poll(self, timeout: float) -> None:
        """Wait up to `timeout` for a task, a readiness probe or an adapter load, and act on what came."""
        waiting = self.group.waiting()
        refs = list(waiting) + list(self._adapter_loads)
        for ref in wait_any(refs, min(timeout, self.group.next_ping_in())):
            if ref in self._adapter_loads:
                self._adapter_loaded(ref)
                continue
            member = waiting[ref]
            if ref is member.probe:
                for task in self._probe_done(member, ref):
                    self._finished(member, task, RuntimeError(f"worker {member.name} was replaced"))
                continue
            if ref not in member.busy:  # its worker was replaced meanwhile: the task is an orphan above
                continue
            task = member.busy.pop(ref)
            try:
                outcome = ray.get(ref)
            except RayActorError as err:
                self.group.reprobe(member)  # answered once Ray has restarted it
                outcome = err
            except RayTaskError as err:
                cause = err.cause if isinstance(err.cause, Exception) else err
                outcome = cause if isinstance(cause, (ReplayUnavailableError, StoreLostError)) else err
            self._finished(member, task, outcome)

    def _probe_done(self, member: Member, ref: ray.ObjectRef) -> list[RolloutTask]:
        """Act on a readiness probe; returns the tasks of a worker that had to be replaced."""
        try:
            self.group.mark_ready(member, ray.get(ref))
            self._catch_up(member)
        except ActorUnavailableError:
            self.group.reprobe(member, delay_s=_PROBE_RETRY_S)
        except RayActorError as err:
            if err.actor_init_failed:
                # E.g. the learner was restarting when this worker asked it for the adapter; a config
                # or checkpoint problem fails every fresh worker too and stops the run.
                self.init_failures += 1
                if self.init_failures > self.max_init_failures:
                    raise RuntimeError(
                        f"rollout workers failed in their constructor {self.init_failures} times in a row; "
                        f"last ({member.name}): {err}"
                    ) from err
                why = f"it failed in its constructor ({err})"
                time.sleep(min(30.0, 2.0 ** (self.init_failures - 1)))  # e.g. give a restarting learner time
            else:
                why = f"it died and was not restarted ({type(err).__name__})"
            orphans = list(member.busy.values())
            member.busy.clear()
            self.group.replace(member, why)
            return orphans
        self.init_failures = 0
        return []

    def _catch_up(self, member: Member) -> None:
        """Give a worker that just became ready the last broadcast adapter, if it holds an older one."""
        info: WorkerInfo | None = member.info
        if self._latest_adapter is None or info is None or info.adapter is None:
            return
        version, ref = self._latest_adapter
        if info.version < version:
            try:
                info.version = ray.get(member.handle.set_adapter.remote(version, ref))
            except RayActorError:
                self.group.reprobe(member)  # died again: it pulls the adapter when restarted
            except ObjectLostError as err:
                _adapter_lost(member, version, err)

    def _await_store(self) -> None:
        wait_for_store(self.store_url, self.store_outage_s, "finished groups cannot be stored")


def _adapter_lost(member: Member, version: int, err: ObjectLostError) -> None:
    """An adapter whose owner, the learner that published it, died before the worker loaded it (a load
    queued behind a group, with pipelining): the worker keeps the adapter it holds, and the broadcast
    that follows the learner's restart brings it the restored one."""
    log.warning("%s could not load adapter version %d: the learner that published it is gone (%s)",
                member.name, version, type(err).__name__)


def wait_for_store(store_url: str, outage_s: float, consequence: str) -> None:
    """Return once the replay store answers; ReplayUnavailableError after `outage_s` seconds."""
    start = time.monotonic()
    while True:
        try:
            with open_store(store_url) as store:
                store.stats()
            return
        except ReplayUnavailableError as err:
            waited = time.monotonic() - start
            if waited >= outage_s:
                raise ReplayUnavailableError(
                    f"the replay store stayed unreachable for {waited:.0f}s (store_outage_s={outage_s}); "
                    f"{consequence}: {err}"
                ) from err
            log.warning("replay store unreachable for %.0fs; waiting for it", waited)
            time.sleep(min(2.0, max(0.0, outage_s - waited)))
