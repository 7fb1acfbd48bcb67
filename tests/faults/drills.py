"""Fault drills: actors that die (os._exit, as a killed process does) or stop Redis at a chosen point, once.

A drill is armed by creating a flag file `<drill_dir>/<point>@<key>`; the actor that reaches that
point with that key deletes the file and acts, so the process Ray restarts in its place runs on.
Ray worker processes import this module by name (the fault tests put this directory on their
PYTHONPATH), which is also how the reward pool finds the `drills:crash_reward` reward.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from replay import redis_connection
from reward_service.base import RewardModel
from reward_service.registry import register_reward
from rollout_workers.simulated import FixedCostReward, SimulatedRolloutWorker

CRASH_REWARD = "drills:crash_reward"


def arm(drill_dir: str | Path, point: str, key: object = "any") -> Path:
    path = Path(drill_dir) / f"{point}@{key}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def armed(drill_dir: str | Path) -> list[str]:
    """Drills not yet fired."""
    return sorted(p.name for p in Path(drill_dir).glob("*@*"))


def take(drill_dir: str | Path, point: str, key: object = "any") -> bool:
    """True once if the drill `point@key` is armed (it is disarmed)."""
    try:
        os.unlink(Path(drill_dir) / f"{point}@{key}")
        return True
    except FileNotFoundError:
        return False


def fire(drill_dir: str | Path, point: str, key: object = "any") -> None:
    """Exit this process now if the drill `point@key` is armed."""
    if take(drill_dir, point, key):
        os._exit(1)


def shutdown_redis(store_url: str) -> None:
    """Stop the Redis a store URL names (SHUTDOWN: it writes its append-only file, then exits)."""
    connection, _ = redis_connection(store_url)
    try:  # no client retry: a retried SHUTDOWN would stop the restarted server again
        redis.Redis(**connection, retry=Retry(NoBackoff(), 0)).shutdown()
    except redis.ConnectionError:
        pass  # the server closed the connection: it is going down


class DrillRolloutWorker(SimulatedRolloutWorker):
    """Dies before pushing group X (`worker-before-push@X`) or right after (`worker-after-push@X`);
    stops Redis before pushing X with `redis-down-before-push@X`."""

    def __init__(self, config, name, reward_server, store_url, *args, drill_dir: str, **kwargs) -> None:
        super().__init__(config, name, reward_server, store_url, *args, **kwargs)
        self.drill_dir, self.store_url = drill_dir, store_url

    def store_group(self, group, task, rollout_s, reward_s):
        fire(self.drill_dir, "worker-before-push", task.group_id)
        if take(self.drill_dir, "redis-down-before-push", task.group_id):
            shutdown_redis(self.store_url)
        summary = super().store_group(group, task, rollout_s, reward_s)
        fire(self.drill_dir, "worker-after-push", task.group_id)
        return summary


class CrashReward(FixedCostReward):
    """The fixed-cost stand-in reward; dies halfway through a batch while `reward-mid-batch@any` is armed."""

    def __init__(self, cost_s: float, drill_dir: str) -> None:
        super().__init__(cost_s)
        self.drill_dir = drill_dir

    def score(self, videos, prompts):
        if (Path(self.drill_dir) / "reward-mid-batch@any").exists():
            time.sleep(self.cost_s / 2)
            fire(self.drill_dir, "reward-mid-batch")
        return super().score(videos, prompts)


@register_reward("crash_reward")
def build_crash_reward(cost_s: float = 0.0, drill_dir: str = "") -> RewardModel:
    return CrashReward(cost_s, drill_dir)
