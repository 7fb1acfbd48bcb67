"""Membership and polling of an elastic group of restartable Ray actors.

What it keeps: which actors exist, which are starting (a readiness probe in flight or scheduled),
which are draining (take no new work, are killed once their work is done), and the work in flight
on each (an ObjectRef -> the owner's payload). What it leaves to its owner: what work is, how
results and failures are handled, and when a member is replaced (the fleet and the pool differ
there on purpose).

Ray's own tools do the rest: restarts come from the actors' `max_restarts` option (the owner passes
it), and polling is `ray.wait`. `ray.util.ActorPool` is not used: it has no notion of actors that
die, restart, start late (waiting for a node), drain or are replaced, nor of several calls in flight
on one actor.

Not thread-safe: an owner that is called from several threads (the reward pool, inside a threaded
Ray actor) holds its own lock around these calls and around nothing else while it waits
(`waiting()` under the lock, `wait_any` outside it, then handle the results under it again).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import ray

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Member:
    name: str
    handle: "ray.actor.ActorHandle"
    probe: "ray.ObjectRef | None" = None  # a readiness call in flight
    ping_at: float | None = None  # when a (re)starting actor is next probed, while no probe is in flight
    draining: bool = False
    busy: dict = field(default_factory=dict)  # ObjectRef of a call in flight -> the owner's payload
    info: Any = None  # what the last readiness probe answered
    started_at: float = field(default_factory=time.monotonic)  # start, or the start of its last recovery
    last_work_at: float = 0.0
    crashes: int = 0  # deaths the owner has seen (Ray restarts it up to max_restarts)
    probe_failures: int = 0  # failed readiness probes since it last became ready

    @property
    def starting(self) -> bool:
        """Starting or restarting: not yet answered its readiness probe."""
        return self.probe is not None or self.ping_at is not None

    @property
    def ready(self) -> bool:
        return not self.starting

    @property
    def takes_work(self) -> bool:
        return self.ready and not self.draining


class ActorGroup:
    """The members of one elastic group. `start_actor(name)` creates an actor (with the owner's Ray
    options, `max_restarts` included); `probe(handle)` makes a cheap call that answers once the
    actor's constructor has returned."""

    def __init__(
        self,
        prefix: str,
        start_actor: Callable[[str], "ray.actor.ActorHandle"],
        probe: Callable[["ray.actor.ActorHandle"], "ray.ObjectRef"],
    ) -> None:
        self.prefix = prefix
        self._start_actor = start_actor
        self._probe = probe
        self._names = itertools.count()
        self.members: list[Member] = []
        self.replaced = 0

    # ---- membership ---------------------------------------------------------------------------
    def start(self) -> Member:
        name = f"{self.prefix}-{next(self._names)}"
        handle = self._start_actor(name)
        member = Member(name, handle, probe=self._probe(handle))
        self.members.append(member)
        return member

    def resize(self, size: int) -> None:
        """Start members up to `size`, or mark the cheapest to lose draining (starting ones, then
        those with the least work in flight); idle draining ones are killed at once."""
        active = [m for m in self.members if not m.draining]
        for _ in range(size - len(active)):
            self.start()
        cheapest_first = sorted(active, key=lambda m: (m.ready, len(m.busy)))
        for member in cheapest_first[: max(0, len(active) - size)]:
            member.draining = True
        self.retire_idle()

    def retire_idle(self) -> None:
        """Kill the draining members that have no work in flight."""
        for member in [m for m in self.members if m.draining and not m.busy]:
            self.remove(member)

    def remove(self, member: Member) -> None:
        ray.kill(member.handle, no_restart=True)
        member.probe = member.ping_at = None  # a probe of it still in someone's wait is stale now
        if member in self.members:
            self.members.remove(member)

    def replace(self, member: Member, why: str) -> Member:
        """Kill `member` for good and start a fresh actor in its place (its work in flight is the
        owner's to hand out again)."""
        log.warning("replacing %s: %s", member.name, why)
        ray.kill(member.handle, no_restart=True)
        member.probe = member.ping_at = None
        fresh = self.start()
        self.members.remove(fresh)
        self.members[self.members.index(member)] = fresh
        fresh.draining = member.draining
        self.replaced += 1
        self.retire_idle()
        return fresh

    def shutdown(self) -> None:
        for member in list(self.members):
            self.remove(member)

    # ---- readiness ----------------------------------------------------------------------------
    def reprobe(self, member: Member, delay_s: float = 0.0) -> None:
        """Treat `member` as (re)starting: probe it now, or after `delay_s` (while Ray restarts it)."""
        if delay_s > 0:
            member.probe, member.ping_at = None, time.monotonic() + delay_s
        else:
            member.probe, member.ping_at = self._probe(member.handle), None

    def mark_ready(self, member: Member, info: Any) -> None:
        member.probe = member.ping_at = None
        member.info = info
        member.probe_failures = 0

    def settle(self, poll: Callable[[float], object], timeout_s: float | None, poll_s: float,
               describe: Callable[[], str], lock: AbstractContextManager = nullcontext()) -> None:
        """Call `poll(poll_s)` until no member is starting; TimeoutError with `describe()` after
        `timeout_s`. `lock` is held while the members are looked at (see the module docstring)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with lock:
                if not any(m.starting for m in self.members):
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(describe())
            poll(poll_s)

    # ---- work and polling ---------------------------------------------------------------------
    def submit(self, member: Member, ref: "ray.ObjectRef", payload: Any) -> None:
        member.busy[ref] = payload
        member.last_work_at = time.monotonic()

    def waiting(self) -> dict:
        """Send the probes that are due; every ObjectRef in flight -> its member (work or probe)."""
        now = time.monotonic()
        refs: dict = {}
        for member in self.members:
            if member.ping_at is not None and now >= member.ping_at:
                self.reprobe(member)
            refs.update({ref: member for ref in member.busy})
            if member.probe is not None:
                refs[member.probe] = member
        return refs

    def next_ping_in(self) -> float:
        """Seconds to the next scheduled probe (inf if none)."""
        times = [m.ping_at for m in self.members if m.ping_at is not None]
        return max(0.0, min(times) - time.monotonic()) if times else float("inf")


def wait_any(refs: list, timeout: float) -> list:
    """Wait up to `timeout` for one of `refs`, then return every one that is done by then."""
    if not refs:  # e.g. only probes scheduled for later: the caller caps `timeout` at the next one
        time.sleep(max(timeout, 0.005))
        return []
    done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    if done:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return done
