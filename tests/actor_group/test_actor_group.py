"""The elastic actor group on a local Ray cluster, with tiny real actors: start, resize, drain,
restart, replace, probe, poll. One cluster serves the module (starting Ray is the slow part)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError

from actor_group import ActorGroup, wait_any


class Doubler:
    def __init__(self, name: str) -> None:
        self.name = name

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid()}

    def work(self, x: int, sleep_s: float = 0.0) -> int:
        time.sleep(sleep_s)
        return 2 * x

    def die(self) -> None:
        os._exit(1)


@pytest.fixture(scope="module")
def cluster():
    # Ray's workers import this module by name to build `Doubler`; they inherit this environment.
    saved = os.environ.get("PYTHONPATH")
    here = Path(__file__).resolve().parent
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(here), str(here.parents[1]), saved) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def _group(**options) -> ActorGroup:
    remote = ray.remote(Doubler).options(num_cpus=0, **options)
    return ActorGroup("doubler", lambda name: remote.remote(name), lambda handle: handle.ready.remote())


def _poller(group: ActorGroup, done: list):
    """What an owner does with the group's poll: mark probes ready (or ask again), collect work."""
    def poll(timeout: float) -> None:
        waiting = group.waiting()
        for ref in wait_any(list(waiting), min(timeout, group.next_ping_in())):
            member = waiting[ref]
            if ref is member.probe:
                try:
                    group.mark_ready(member, ray.get(ref))
                except RayActorError as err:
                    if err.actor_init_failed:
                        raise
                    group.reprobe(member, delay_s=0.1)  # Ray is restarting it
            elif ref in member.busy:
                done.append((member.name, member.busy.pop(ref), ray.get(ref)))
    return poll


def _started(size: int, **options):
    """A group of `size` ready members, the list its poll collects finished work into, and the poll."""
    group, done = _group(**options), []
    poll = _poller(group, done)
    group.resize(size)
    group.settle(poll, 60, 0.5, lambda: "not ready")
    return group, done, poll


def _dead(handle) -> bool:
    try:
        ray.get(handle.ready.remote(), timeout=30)
    except RayActorError:
        return True
    return False


def test_resize_starts_new_members_and_removes_idle_ones_first(cluster):
    group, done, poll = _started(2)
    first, second = group.members
    assert {first.info["name"], second.info["name"]} == {"doubler-0", "doubler-1"}
    assert first.info["pid"] != second.info["pid"]

    group.submit(first, first.handle.work.remote(5, 1.0), "five")
    group.resize(1)  # the idle member is the cheapest to lose: killed at once
    assert group.members == [first] and not first.draining
    assert _dead(second.handle)

    group.resize(3)  # grows around the busy member
    group.settle(poll, 60, 0.5, lambda: "not ready")
    assert len(group.members) == 3 and all(m.ready for m in group.members)
    group.submit(first, first.handle.work.remote(7, 1.0), "seven")
    group.resize(1)  # the idle ones go, the busy one stays
    assert group.members == [first] and not first.draining
    while first.busy:
        poll(1.0)
    assert sorted(done) == [("doubler-0", "five", 10), ("doubler-0", "seven", 14)]
    group.shutdown()
    assert not group.members and _dead(first.handle)


def test_a_busy_member_drains_and_leaves_after_its_work(cluster):
    group, done, poll = _started(2)
    for k, member in enumerate(group.members):
        group.submit(member, member.handle.work.remote(k + 1, 1.0 + k), k)
    first, second = group.members
    group.resize(1)  # both busy with one call each: the first in order drains
    draining = [m for m in group.members if m.draining]
    assert draining == [first] and group.members == [first, second]
    assert not _dead(draining[0].handle)  # still working
    while any(m.busy for m in group.members):
        poll(1.0)
        group.retire_idle()
    assert group.members == [second] and not second.draining
    assert _dead(first.handle)
    assert sorted(result for _, _, result in done) == [2, 4]
    group.shutdown()


def test_a_member_that_dies_is_restarted_by_ray_and_probed_back(cluster):
    group, done, poll = _started(1, max_restarts=1)
    (member,) = group.members
    old_pid = member.info["pid"]
    with pytest.raises(RayActorError):
        ray.get(member.handle.die.remote())
    group.reprobe(member, delay_s=0.2)
    assert member.starting and not member.takes_work
    group.settle(poll, 60, 0.5, lambda: "not back")
    assert member.info["name"] == "doubler-0" and member.info["pid"] != old_pid
    assert ray.get(member.handle.work.remote(21)) == 42
    group.shutdown()


def test_replace_puts_a_fresh_actor_in_the_same_place(cluster):
    group, done, poll = _started(2)
    old = group.members[0]
    fresh = group.replace(old, "a test asked")
    assert group.members[0] is fresh and fresh.name == "doubler-2" and group.replaced == 1
    assert old.probe is None and _dead(old.handle)
    group.settle(poll, 60, 0.5, lambda: "not ready")
    assert fresh.info["name"] == "doubler-2"
    group.shutdown()


def test_settle_times_out_naming_what_did_not_start(cluster):
    group, done = _group(resources={"no_such_node_resource": 1}), []
    group.resize(1)
    with pytest.raises(TimeoutError, match="doubler-0 never got its resources"):
        group.settle(_poller(group, done), 1.0, 0.2, lambda: f"{group.members[0].name} never got its resources")
    group.shutdown()
