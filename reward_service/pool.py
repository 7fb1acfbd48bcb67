"""A pool of Ray reward actors: batching, spreading, timeouts, retries, resizing.

Each actor builds its reward models from the registry (name + config) once, then scores batches.
`RewardPool.score(videos, prompts)` cuts the request into batches, puts each batch's frames in the
Ray object store once (`ray.put`) and hands the reference to an idle actor; results are written back
at their request's position, whatever order the batches finish in.

Failures: a batch whose actor dies (or exceeds `timeout_s`, and is then killed) is retried on
another actor, up to `max_attempts` dispatches; the dead actor is restarted by Ray (`max_restarts`)
or, once its restarts are spent, replaced by a fresh one. A reward model that raises or returns
NaN/inf on some samples marks only those samples invalid, with a reason (see `scoring.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actor_group import ActorGroup, Member, wait_any
from reward_service.actor import RewardActor, RewardSpec
from reward_service.base import Video
from reward_service.pool_metrics import PoolMetrics
from reward_service.registry import resolve_factory
from reward_service.result import RewardResult
from reward_service.scoring import BATCH_FAILED

log = logging.getLogger(__name__)

_READY_RETRIES = 3  # unexplained failed readiness pings before an actor is replaced
_RESTART_POLL_S = 0.25  # how often a restarting actor is asked whether it is back


_RemoteRewardActor = ray.remote(RewardActor)


@dataclass(eq=False)
class _Job:
    results: list
    remaining: int


@dataclass(eq=False)
class _Batch:
    job: _Job
    offset: int  # position of the batch's first sample in the job
    videos_ref: ray.ObjectRef
    start: int  # slice of the referenced video list
    stop: int
    prompts: list[str]
    attempts: int = 0
    avoid: set[str] = field(default_factory=set)
    last_error: str = ""


class RewardPool:
    """N reward actors behind one `score` call. See the module docstring.

    The actors are an `ActorGroup`: a member is starting (its `ready` ping pending), idle, or busy
    with one batch (the ObjectRef of its `score` call -> the batch)."""

    def __init__(
        self,
        rewards: Sequence[RewardSpec | str | tuple[str, dict]],
        num_actors: int = 1,
        *,
        batch_size: int = 4,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        resources: dict[str, float] | None = None,
        timeout_s: float = 300.0,
        max_attempts: int = 3,
        max_restarts: int = 1,
        start_timeout_s: float = 900.0,
    ) -> None:
        self.specs = [_as_spec(r) for r in rewards]
        if not self.specs:
            raise ValueError("RewardPool needs at least one reward")
        for spec in self.specs:
            resolve_factory(spec.name)  # an unknown name fails here, not inside an actor
        if num_actors < 1 or batch_size < 1 or max_attempts < 1 or max_restarts < 0:
            raise ValueError(
                f"need num_actors >= 1, batch_size >= 1, max_attempts >= 1, max_restarts >= 0; got "
                f"{num_actors}, {batch_size}, {max_attempts}, {max_restarts}"
            )
        if not ray.is_initialized():
            raise RuntimeError("RewardPool needs a running Ray: call ray.init() first")
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.start_timeout_s = start_timeout_s
        self._actor_options = {"num_gpus": num_gpus, "num_cpus": num_cpus, "max_restarts": max_restarts}
        if resources:  # custom node resources pin the actors to their node group (e.g. {"reward_gpu": 1})
            self._actor_options["resources"] = dict(resources)
        self._lock = threading.RLock()
        self.group = ActorGroup(
            "reward-actor",
            lambda label: _RemoteRewardActor.options(**self._actor_options).remote(self.specs, label),
            lambda handle: handle.ready.remote(),
        )
        self._queue: deque[_Batch] = deque()
        self._start_failures = 0
        self._last_start_error = ""
        self.metrics_store = PoolMetrics()
        self.heads: tuple[str, ...] = ()
        self.resize(num_actors)

    # ---- public API -------------------------------------------------------------------------
    def score(self, videos: Sequence[Video], prompts: Sequence[str]) -> list[RewardResult]:
        """One RewardResult per video, in order. Each batch's frames are `ray.put` once."""
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        batches = []
        for offset in range(0, len(videos), self.batch_size):
            chunk = list(videos[offset : offset + self.batch_size])
            ref = ray.put(chunk)
            batches.append((offset, ref, 0, len(chunk)))
        return self._run(batches, prompts)

    def score_ref(self, videos_ref: ray.ObjectRef, prompts: Sequence[str]) -> list[RewardResult]:
        """Score a `list[Video]` already in the object store (e.g. put there by the rollout worker
        that decoded it); batches are slices of it, so no frame passes through this process."""
        if not isinstance(videos_ref, ray.ObjectRef):
            raise TypeError(f"score_ref takes an ObjectRef of a list of Video, got {type(videos_ref).__name__}")
        batches = [
            (offset, videos_ref, offset, min(offset + self.batch_size, len(prompts)))
            for offset in range(0, len(prompts), self.batch_size)
        ]
        return self._run(batches, prompts)

    def resize(self, num_actors: int, wait: bool = True) -> None:
        """Grow or shrink the pool. New actors start (and, with `wait`, are ready on return);
        removed actors take no new batch and are killed once their current batch is done."""
        if num_actors < 1:
            raise ValueError(f"a reward pool needs at least one actor, got {num_actors}")
        with self._lock:
            self.group.resize(num_actors)  # starting, then idle actors go first; busy ones drain
            self.metrics_store.set_actors(self.num_actors)
            log.info("reward pool resized to %d actors", num_actors)
        if wait:
            self._settle()

    def _settle(self) -> None:
        """Wait until no actor is starting or restarting."""
        self.group.settle(
            self._poll, self.start_timeout_s, 0.5,
            lambda: f"reward actors not ready after {self.start_timeout_s}s: {self._last_start_error}",
            lock=self._lock,
        )

    @property
    def num_actors(self) -> int:
        """Actors that take new batches (draining ones excluded)."""
        with self._lock:
            return sum(not m.draining for m in self.group.members)

    def actor_handles(self) -> dict[str, ray.actor.ActorHandle]:
        """Handles of the actors taking new batches, by label."""
        with self._lock:
            return {m.name: m.handle for m in self.group.members if not m.draining}

    def actor_pids(self) -> dict[str, int]:
        """Ask every live actor for its process id (a real round trip to each), once none is
        starting or restarting."""
        self._settle()
        handles = self.actor_handles()
        infos = ray.get([h.ready.remote() for h in handles.values()], timeout=self.start_timeout_s)
        return {label: info["pid"] for label, info in zip(handles, infos)}

    def metrics(self) -> dict:
        """Counters, invalid samples by reason kind, latencies (see PoolMetrics)."""
        return self.metrics_store.snapshot()

    def shutdown(self) -> None:
        with self._lock:
            self.group.shutdown()
            self.metrics_store.set_actors(0)

    # ---- scheduling ------------------------------------------------------------------------
    def _run(self, batches: list[tuple], prompts: Sequence[str]) -> list[RewardResult]:
        started = time.monotonic()
        job = _Job(results=[None] * len(prompts), remaining=len(batches))
        with self._lock:
            for offset, ref, start, stop in batches:
                self._queue.append(_Batch(job, offset, ref, start, stop, list(prompts[offset : offset + stop - start])))
        self.metrics_store.add("requests")
        self.metrics_store.add("samples", len(prompts))
        while job.remaining > 0:
            self._dispatch()
            self._poll(0.5)
        self.metrics_store.observe("request_latency_s", time.monotonic() - started)
        self.metrics_store.record_results(job.results)
        return job.results

    def _dispatch(self) -> None:
        with self._lock:
            for batch in list(self._queue):
                member = self._pick_member(batch)
                if member is None:
                    continue
                self._queue.remove(batch)
                batch.attempts += 1
                future = member.handle.score.remote(batch.videos_ref, batch.start, batch.stop, batch.prompts)
                self.group.submit(member, future, batch)
                self.metrics_store.add("batches")

    def _pick_member(self, batch: _Batch) -> Member | None:
        live = [m for m in self.group.members if not m.draining]
        idle = [m for m in live if m.ready and not m.busy]
        preferred = [m for m in idle if m.name not in batch.avoid]
        if preferred:
            return preferred[0]
        # Retry on the failed actor only when no other actor could take the batch.
        if idle and all(m.name in batch.avoid for m in live):
            return idle[0]
        return None

    def _poll(self, timeout: float) -> None:
        """Wait up to `timeout` for a batch or a readiness ping to finish, and act on what did."""
        with self._lock:
            waiting = self.group.waiting()
            if self._queue and not self.group.members:
                raise RuntimeError("reward pool has batches to score but no actor")
            timeout = min(timeout, self._time_to_deadline())
        ready = wait_any(list(waiting), timeout)  # without the lock: other requests go on meanwhile
        with self._lock:
            for ref in ready:
                member = waiting[ref]
                if ref in member.busy:
                    self._finish_batch(member, ref)
                elif ref is member.probe:
                    self._finish_start(member, ref)
            self._expire_timeouts()

    def _time_to_deadline(self) -> float:
        times = [m.last_work_at + self.timeout_s for m in self.group.members if m.busy]
        to_batch = max(0.0, min(times) - time.monotonic()) if times else float("inf")
        return min(to_batch, self.group.next_ping_in())

    def _finish_batch(self, member: Member, future: ray.ObjectRef) -> None:
        batch = member.busy.pop(future)
        try:
            results = ray.get(future)
            if len(results) != batch.stop - batch.start:
                raise RuntimeError(f"actor returned {len(results)} results for {batch.stop - batch.start} videos")
        except RayActorError as exc:
            self.metrics_store.add("actor_failures")
            log.warning("reward actor %s died while scoring a batch: %s", member.name, _short(exc))
            self._requeue(batch, member.name, f"actor {member.name} died: {_short(exc)}")
            self._recover(member)
            return
        except Exception as exc:  # the task failed but the actor lives (e.g. a lost video object)
            log.warning("reward batch failed on %s: %s", member.name, _short(exc))
            self._requeue(batch, member.name, f"{type(exc).__name__}: {_short(exc)}")
        else:
            batch.job.results[batch.offset : batch.offset + len(results)] = results
            batch.job.remaining -= 1
            self.metrics_store.observe("batch_latency_s", time.monotonic() - member.last_work_at)
        self._release(member)

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        for member in list(self.group.members):
            if member.busy and now - member.last_work_at > self.timeout_s:
                self.metrics_store.add("batch_timeouts")
                log.warning("reward batch on %s exceeded %.1fs; killing the actor", member.name, self.timeout_s)
                (batch,) = member.busy.values()
                member.busy.clear()
                ray.kill(member.handle, no_restart=False)  # Ray restarts it while restarts remain
                self._requeue(batch, member.name, f"timed out after {self.timeout_s}s on {member.name}")
                self._recover(member)

    def _requeue(self, batch: _Batch, label: str, error: str) -> None:
        batch.avoid.add(label)
        batch.last_error = error
        if batch.attempts >= self.max_attempts:
            self.metrics_store.add("batches_failed")
            reason = f"{BATCH_FAILED}: no result after {batch.attempts} attempts; last error: {error}"
            n = batch.stop - batch.start
            batch.job.results[batch.offset : batch.offset + n] = [RewardResult.invalid(self.heads, reason)] * n
            batch.job.remaining -= 1
        else:
            self.metrics_store.add("batches_retried")
            self._queue.appendleft(batch)

    def _release(self, member: Member) -> None:
        """A member that finished a batch (or started) is idle, or leaves if it drains."""
        if member.draining:
            self._remove(member)

    def _recover(self, member: Member) -> None:
        """After a crash or kill: wait for Ray's restart, or replace the actor once restarts are spent."""
        if member.draining:
            self._remove(member)
            return
        member.crashes += 1
        if member.crashes > self.max_restarts:
            self._replace(member, f"it crashed {member.crashes} times (max_restarts={self.max_restarts})")
        else:
            member.probe_failures, member.started_at = 0, time.monotonic()
            self.group.reprobe(member, delay_s=_RESTART_POLL_S)

    def _finish_start(self, member: Member, ref: ray.ObjectRef) -> None:
        try:
            info = ray.get(ref)
        except Exception as exc:
            self._start_failed(member, exc)
            return
        self._start_failures = 0
        self.heads = tuple(info["heads"])
        self.group.mark_ready(member, info)
        self._release(member)

    def _start_failed(self, member: Member, exc: Exception) -> None:
        """A readiness ping failed: ask again (Ray may be restarting it), or replace the actor."""
        if isinstance(exc, RayActorError) and exc.actor_init_failed:
            self._remove(member)
            raise RuntimeError(f"reward actor {member.name} could not build its rewards: {_short(exc)}") from exc
        self._last_start_error = _short(exc)
        self.group.reprobe(member, delay_s=_RESTART_POLL_S)  # unless replaced below: ask again soon
        restarting = isinstance(exc, ActorUnavailableError)
        if restarting and time.monotonic() - member.started_at < self.start_timeout_s:
            return  # Ray is restarting it
        member.probe_failures += 1
        if not isinstance(exc, ActorDiedError) and member.probe_failures < _READY_RETRIES:
            return
        self._start_failures += 1
        if self._start_failures > _READY_RETRIES * max(1, len(self.group.members)):
            raise RuntimeError(f"reward actors keep failing to start: {self._last_start_error}") from exc
        self._replace(member, f"it did not answer its readiness ping: {self._last_start_error}")

    def _replace(self, member: Member, why: str) -> None:
        self.group.replace(member, why)
        self.metrics_store.add("actors_replaced")

    def _remove(self, member: Member) -> None:
        self.group.remove(member)
        self.metrics_store.set_actors(self.num_actors)


def _as_spec(reward: RewardSpec | str | tuple[str, dict]) -> RewardSpec:
    if isinstance(reward, RewardSpec):
        return reward
    if isinstance(reward, str):
        return RewardSpec(reward)
    name, config = reward
    return RewardSpec(name, dict(config))


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[-1] if text else type(exc).__name__
    return first[:limit]
