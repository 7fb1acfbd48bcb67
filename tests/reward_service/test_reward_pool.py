"""The reward actor pool on a local Ray cluster, with real (small) reward models.

One Ray cluster and one pool serve the whole module (starting Ray and its worker processes is
the slow part); each test reads metric deltas, and puts the pool back to two actors.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError

from reward_service.base import Video
from reward_service.pool import RewardPool, RewardSpec
from toy_rewards import brightness

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def flag_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flags")


@pytest.fixture(scope="module")
def pool(flag_dir):
    # Workers import the toy rewards by module name; they inherit this environment.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(HERE.parents[1]), saved) if p)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rewards = [
        RewardSpec("toy_rewards:toy_brightness"),
        RewardSpec("toy_rewards:toy_raising"),
        RewardSpec("toy_rewards:toy_nan"),
        RewardSpec("toy_rewards:toy_crash_once", {"flag": str(flag_dir / "once")}),
    ]
    pool = RewardPool(rewards, num_actors=2, batch_size=2, num_cpus=0.5, max_restarts=1, timeout_s=4.0)
    yield pool
    pool.shutdown()
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def _videos(n: int, seed: int = 0) -> list[Video]:
    rng = np.random.default_rng(seed)
    return [Video(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 8.0) for _ in range(n)]


def _assert_brightness(results, videos) -> None:
    for result, video in zip(results, videos, strict=True):
        np.testing.assert_allclose([result.scores[h] for h in ("R", "G", "B")], brightness(video), rtol=1e-12)


def _delta(pool, before: dict, *names: str) -> tuple:
    now = pool.metrics()
    return tuple(now[n] - before[n] for n in names)


def test_results_come_back_matched_to_requests_whatever_order_batches_finish(pool):
    pool.batch_size = 1
    videos = _videos(8)
    sleeps = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35]
    random.Random(3).shuffle(sleeps)
    prompts = [f"clip {i} sleep={s}" for i, s in enumerate(sleeps)]
    before = pool.metrics()
    results = pool.score(videos, prompts)
    assert all(r.valid for r in results)
    _assert_brightness(results, videos)
    assert len({r.scored_by for r in results}) == 2  # spread over both actors

    ref = ray.put(videos)  # already in the object store, as a rollout worker leaves it
    again = pool.score_ref(ref, prompts)
    _assert_brightness(again, videos)
    assert _delta(pool, before, "requests", "samples", "valid_samples", "batches") == (2, 16, 16, 16)
    assert pool.metrics()["request_latency_s"]["count"] >= 2


def test_concurrent_requests_from_threads_each_get_their_own_results(pool):
    pool.batch_size = 1
    requests = {k: _videos(4, seed=10 + k) for k in range(3)}
    out = {}
    threads = [
        threading.Thread(target=lambda k=k: out.__setitem__(k, pool.score(requests[k], ["sleep=0.1"] * 4))) for k in requests
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for k, videos in requests.items():
        _assert_brightness(out[k], videos)


def test_raising_and_nan_rewards_invalidate_only_their_samples(pool):
    pool.batch_size = 4
    videos = _videos(4, seed=1)
    before = pool.metrics()["invalid_samples"]
    results = pool.score(videos, ["fine", "RAISE me", "NAN me", "fine too"])
    assert [r.valid for r in results] == [True, False, False, True]
    assert results[1].reason.startswith("exception: toy_raising raised ValueError: marked sample")
    assert results[2].reason.startswith("non_finite: toy_nan head peak returned nan")
    _assert_brightness(results, videos)  # every sample's other heads were still computed
    assert results[0].scores["ok"] == 1.0 and results[3].scores["ok"] == 1.0
    assert np.isnan(results[1].scores["ok"]) and np.isnan(results[2].scores["peak"])
    assert results[0].scores["peak"] == videos[0].frames.max() / 255.0
    after = pool.metrics()["invalid_samples"]
    assert after.get("exception", 0) - before.get("exception", 0) == 1
    assert after.get("non_finite", 0) - before.get("non_finite", 0) == 1


def test_actor_killed_mid_batch_is_restarted_and_batch_retried(pool, flag_dir):
    pool.batch_size = 2
    (flag_dir / "once").touch()
    before_pids = pool.actor_pids()
    videos = _videos(6, seed=2)
    before = pool.metrics()
    results = pool.score(videos, ["a", "b", "c CRASH", "d", "e", "f"])  # os._exit inside the actor
    assert all(r.valid for r in results) and not (flag_dir / "once").exists()
    _assert_brightness(results, videos)
    assert _delta(pool, before, "actor_failures", "batches_retried", "batches", "actors_replaced") == (1, 1, 4, 0)
    after_pids = pool.actor_pids()
    assert after_pids.keys() == before_pids.keys() and pool.num_actors == 2
    (crashed,) = [label for label in before_pids if after_pids[label] != before_pids[label]]  # restarted
    assert results[2].scored_by != crashed and results[3].scored_by != crashed  # retried on the other actor


def test_dead_actor_is_replaced(pool):
    pool.batch_size = 1
    victim = next(iter(pool.actor_handles().values()))
    ray.kill(victim, no_restart=True)  # gone for good: Ray will not restart it
    videos = _videos(4, seed=5)
    before = pool.metrics()
    results = pool.score(videos, ["a", "b", "c", "d"])
    assert all(r.valid for r in results)
    _assert_brightness(results, videos)
    assert pool.num_actors == 2 and len(pool.actor_pids()) == 2
    assert _delta(pool, before, "actors_replaced")[0] == 1


def test_batch_over_timeout_is_killed_and_retried_elsewhere(pool, flag_dir):
    pool.batch_size = 1
    (flag_dir / "once").touch()
    videos = _videos(3, seed=3)
    before = pool.metrics()
    started = time.monotonic()
    results = pool.score(videos, ["HANG", "x", "y"])  # the first batch sleeps 60 s once
    assert time.monotonic() - started < 40
    assert all(r.valid for r in results)
    _assert_brightness(results, videos)
    assert _delta(pool, before, "batch_timeouts", "batches_retried") == (1, 1)
    assert pool.num_actors == 2 and len(pool.actor_pids()) == 2


def test_resize_up_and_down_takes_effect_and_removed_actors_drain(pool):
    pool.batch_size = 1
    pool.resize(3)
    assert pool.num_actors == 3 and len(set(pool.actor_pids().values())) == 3
    videos = _videos(6, seed=4)
    results = pool.score(videos, ["sleep=0.3"] * 6)
    assert len({r.scored_by for r in results}) == 3
    handles = list(pool.actor_handles().values())

    # Shrink while batches are running: the removed actors finish theirs, then die.
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", pool.score(videos, ["sleep=0.5"] * 6)))
    worker.start()
    time.sleep(0.3)
    pool.resize(1)
    assert pool.num_actors == 1
    worker.join(timeout=60)
    assert all(r.valid for r in out["r"])
    _assert_brightness(out["r"], videos)
    assert len(pool.actor_pids()) == 1 and pool.metrics()["actors"] == 1
    dead = 0
    for handle in handles:
        try:
            ray.get(handle.ready.remote(), timeout=30)
        except RayActorError:
            dead += 1
    assert dead == 2
    pool.resize(2)


def test_bad_reward_name_or_config_is_reported_clearly(pool):
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        RewardPool(["no_such_reward"])
    with pytest.raises(RuntimeError, match=r"could not build.*toy_brightness' rejected its config \(keys \['bogus'\]\)"):
        RewardPool([RewardSpec("toy_rewards:toy_brightness", {"bogus": 1})], num_cpus=0.5)
