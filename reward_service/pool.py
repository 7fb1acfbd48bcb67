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

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

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


@dataclass(eq=False)
class _Slot:
    label: str
    handle: ray.actor.ActorHandle
    state: str = "starting"  # starting | idle | busy
    ready_ref: ray.ObjectRef | None = None
    ready_failures: int = 0
    recovering_since: float = 0.0
    ping_at: float = 0.0  # when a restarting actor is next asked (ready_ref is None meanwhile)
    crashes: int = 0
    batch: _Batch | None = None
    future: ray.ObjectRef | None = None
    started_at: float = 0.0
    draining: bool = False


class RewardPool:
    """N reward actors behind one `score` call. See the module docstring."""

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
        self._slots: list[_Slot] = []
        self._queue: deque[_Batch] = deque()
        self._labels = itertools.count()
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
            active = [s for s in self._slots if not s.draining]
            for _ in range(num_actors - len(active)):
                self._slots.append(self._start_actor())
            # Remove the cheapest first: starting, then idle, then busy (which drain).
            order = {"starting": 0, "idle": 1, "busy": 2}
            for slot in sorted(active, key=lambda s: order[s.state])[: max(0, len(active) - num_actors)]:
                slot.draining = True
                if slot.state != "busy":
                    self._remove(slot)
            self.metrics_store.set_actors(self.num_actors)
            log.info("reward pool resized to %d actors", num_actors)
        if wait:
            self._settle()

    def _settle(self) -> None:
        """Wait until no actor is starting or restarting."""
        deadline = time.monotonic() + self.start_timeout_s
        while self._any_starting():
            if time.monotonic() > deadline:
                raise TimeoutError(f"reward actors not ready after {self.start_timeout_s}s: {self._last_start_error}")
            self._poll(0.5)

    @property
    def num_actors(self) -> int:
        """Actors that take new batches (draining ones excluded)."""
        with self._lock:
            return sum(not s.draining for s in self._slots)

    def actor_handles(self) -> dict[str, ray.actor.ActorHandle]:
        """Handles of the actors taking new batches, by label."""
        with self._lock:
            return {s.label: s.handle for s in self._slots if not s.draining}

    def actor_pids(self) -> dict[str, int]:
        """Ask every live actor for its process id (a real round trip to each), once none is
        starting or restarting."""
        self._settle()
        with self._lock:
            handles = {s.label: s.handle for s in self._slots if not s.draining}
        infos = ray.get([h.ready.remote() for h in handles.values()], timeout=self.start_timeout_s)
        return {label: info["pid"] for label, info in zip(handles, infos)}

    def metrics(self) -> dict:
        """Counters, invalid samples by reason kind, latencies (see PoolMetrics)."""
        return self.metrics_store.snapshot()

    def shutdown(self) -> None:
        with self._lock:
            for slot in list(self._slots):
                self._remove(slot)

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
                slot = self._pick_slot(batch)
                if slot is None:
                    continue
                self._queue.remove(batch)
                batch.attempts += 1
                slot.state, slot.batch, slot.started_at = "busy", batch, time.monotonic()
                slot.future = slot.handle.score.remote(batch.videos_ref, batch.start, batch.stop, batch.prompts)
                self.metrics_store.add("batches")

    def _pick_slot(self, batch: _Batch) -> _Slot | None:
        live = [s for s in self._slots if not s.draining]
        idle = [s for s in live if s.state == "idle"]
        preferred = [s for s in idle if s.label not in batch.avoid]
        if preferred:
            return preferred[0]
        # Retry on the failed actor only when no other actor could take the batch.
        if idle and all(s.label in batch.avoid for s in live):
            return idle[0]
        return None

    def _poll(self, timeout: float) -> None:
        """Wait up to `timeout` for a batch or a readiness ping to finish, and act on what did."""
        with self._lock:
            now = time.monotonic()
            for slot in self._slots:
                if slot.state == "starting" and slot.ready_ref is None and now >= slot.ping_at:
                    slot.ready_ref = slot.handle.ready.remote()
            waiting = {s.future: s for s in self._slots if s.state == "busy"}
            waiting.update({s.ready_ref: s for s in self._slots if s.state == "starting" and s.ready_ref is not None})
            if self._queue and not self._slots:
                raise RuntimeError("reward pool has batches to score but no actor")
        timeout = min(timeout, self._time_to_deadline())
        ready = []
        if waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        else:
            time.sleep(max(timeout, 0.005))
        with self._lock:
            for ref in ready:
                slot = waiting[ref]
                if slot.state == "busy" and slot.future is ref:
                    self._finish_batch(slot)
                elif slot.state == "starting" and slot.ready_ref is ref:
                    self._finish_start(slot)
            self._expire_timeouts()

    def _time_to_deadline(self) -> float:
        with self._lock:
            times = [s.started_at + self.timeout_s for s in self._slots if s.state == "busy"]
            times += [s.ping_at for s in self._slots if s.state == "starting" and s.ready_ref is None]
        return max(0.0, min(times) - time.monotonic()) if times else float("inf")

    def _finish_batch(self, slot: _Slot) -> None:
        batch, future = slot.batch, slot.future
        slot.batch = slot.future = None
        try:
            results = ray.get(future)
            if len(results) != batch.stop - batch.start:
                raise RuntimeError(f"actor returned {len(results)} results for {batch.stop - batch.start} videos")
        except RayActorError as exc:
            self.metrics_store.add("actor_failures")
            log.warning("reward actor %s died while scoring a batch: %s", slot.label, _short(exc))
            self._requeue(batch, slot.label, f"actor {slot.label} died: {_short(exc)}")
            self._recover(slot)
            return
        except Exception as exc:  # the task failed but the actor lives (e.g. a lost video object)
            log.warning("reward batch failed on %s: %s", slot.label, _short(exc))
            self._requeue(batch, slot.label, f"{type(exc).__name__}: {_short(exc)}")
        else:
            batch.job.results[batch.offset : batch.offset + len(results)] = results
            batch.job.remaining -= 1
            self.metrics_store.observe("batch_latency_s", time.monotonic() - slot.started_at)
        self._release(slot)

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        for slot in list(self._slots):
            if slot.state == "busy" and now - slot.started_at > self.timeout_s:
                self.metrics_store.add("batch_timeouts")
                log.warning("reward batch on %s exceeded %.1fs; killing the actor", slot.label, self.timeout_s)
                batch = slot.batch
                slot.batch = slot.future = None
                ray.kill(slot.handle, no_restart=False)  # Ray restarts it while restarts remain
                self._requeue(batch, slot.label, f"timed out after {self.timeout_s}s on {slot.label}")
                self._recover(slot)

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

    def _release(self, slot: _Slot) -> None:
        if slot.draining:
            self._remove(slot)
        else:
            slot.state = "idle"

    def _recover(self, slot: _Slot) -> None:
        """After a crash or kill: wait for Ray's restart, or replace the actor once restarts are spent."""
        if slot.draining:
            self._remove(slot)
            return
        slot.crashes += 1
        if slot.crashes > self.max_restarts:
            self._replace(slot)
        else:
            slot.state, slot.ready_failures, slot.recovering_since = "starting", 0, time.monotonic()
            slot.ready_ref, slot.ping_at = None, time.monotonic() + _RESTART_POLL_S

    def _finish_start(self, slot: _Slot) -> None:
        try:
            info = ray.get(slot.ready_ref)
        except Exception as exc:
            if isinstance(exc, RayActorError) and exc.actor_init_failed:
                self._remove(slot)
                raise RuntimeError(f"reward actor {slot.label} could not build its rewards: {_short(exc)}") from exc
            self._last_start_error = _short(exc)
            slot.ready_ref = None
            restarting = isinstance(exc, ActorUnavailableError)
            waited = time.monotonic() - (slot.recovering_since or time.monotonic())
            if restarting and waited < self.start_timeout_s:
                slot.ping_at = time.monotonic() + _RESTART_POLL_S  # Ray is restarting it: ask again soon
                return
            slot.ready_failures += 1
            if not isinstance(exc, ActorDiedError) and slot.ready_failures < _READY_RETRIES:
                slot.ping_at = time.monotonic() + _RESTART_POLL_S
                return
            self._start_failures += 1
            if self._start_failures > _READY_RETRIES * max(1, len(self._slots)):
                raise RuntimeError(f"reward actors keep failing to start: {self._last_start_error}") from exc
            self._replace(slot)
            return
        self._start_failures = 0
        self.heads = tuple(info["heads"])
        slot.ready_ref = None
        self._release(slot)

    def _replace(self, slot: _Slot) -> None:
        log.warning("replacing reward actor %s", slot.label)
        ray.kill(slot.handle, no_restart=True)
        fresh = self._start_actor()
        self._slots[self._slots.index(slot)] = fresh
        self.metrics_store.add("actors_replaced")

    def _start_actor(self) -> _Slot:
        label = f"reward-actor-{next(self._labels)}"
        handle = _RemoteRewardActor.options(**self._actor_options).remote(self.specs, label)
        return _Slot(label=label, handle=handle, ready_ref=handle.ready.remote(), recovering_since=time.monotonic())

    def _remove(self, slot: _Slot) -> None:
        ray.kill(slot.handle, no_restart=True)
        if slot in self._slots:
            self._slots.remove(slot)
        self.metrics_store.set_actors(self.num_actors)

    def _any_starting(self) -> bool:
        with self._lock:
            return any(s.state == "starting" for s in self._slots)


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
