"""The driver killed outright in the middle of a run, then `--resume`d: every group applied exactly once
across the two processes.

The first driver process (driver_process.py: the real driver, learner, reward server and a Redis
store; simulated rollout workers) runs until iteration 2's row is written: iterations 0-1 are in
checkpoint iter_000002, iteration 2 is applied by the learner but in no checkpoint (its deliveries
unacked), and iteration 3's rollout has begun. Then its whole process group (the driver, Ray and
every actor) gets SIGKILL. A second process resumes and finishes the run. Counted from independent
sources: the task ids the sampler gives, the checkpoints' applied ids, Redis' applied set and
counters, and metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.config import load_config
from controller.task_sampler import TaskSampler, load_prompts
from replay import open_store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from driver_process import overrides  # noqa: E402

REDIS_URL = os.environ.get("ARCOPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ITERATIONS, GROUPS = 4, 2
KILL_AFTER_ROWS = 3  # iterations 0, 1 (checkpointed) and 2 (applied, not checkpointed)


def _driver(output: Path, store_url: str, weights: Path, *flags: str) -> subprocess.Popen:
    log = (output.parent / f"driver{'-resume' if flags else ''}.log").open("w")
    return subprocess.Popen(
        [sys.executable, str(HERE / "driver_process.py"), str(output), store_url, str(weights), str(ITERATIONS), str(GROUPS), *flags],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own process group: Ray goes with it
    )


def _rows(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _applied_by_checkpoints(output: Path) -> list[str]:
    ids = []
    for path in sorted((output / "checkpoints").glob("iter_*")):
        ids.extend(json.loads((path / "state.json").read_text())["applied_group_ids"])
    return ids


@pytest.mark.slow
def test_driver_killed_mid_run_and_resumed_applies_every_group_once(tmp_path, redis_prefix, untrained_pocket_weights):
    output, store_url = tmp_path / "run", f"{REDIS_URL}?prefix={redis_prefix}"
    config = load_config(None, overrides(store_url, str(untrained_pocket_weights), ITERATIONS, GROUPS))
    sampler = TaskSampler(config, load_prompts(config.rollout.prompts), 4, output.name)
    expected = [t.group_id for i in range(ITERATIONS) for t in sampler.tasks(i, GROUPS)]

    first = _driver(output, store_url, untrained_pocket_weights)
    try:
        deadline = time.monotonic() + 240
        while len(_rows(output)) < KILL_AFTER_ROWS:
            assert first.poll() is None, (output.parent / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first driver did not reach iteration 2"
            time.sleep(0.05)
    finally:
        _kill_group(first)
    assert first.returncode == -signal.SIGKILL
    at_kill = [r["iteration"] for r in _rows(output)]
    assert at_kill[:KILL_AFTER_ROWS] == [0, 1, 2] and len(at_kill) < ITERATIONS
    checkpoints_at_kill = sorted(p.name for p in (output / "checkpoints").glob("iter_*"))
    assert checkpoints_at_kill[0] == "iter_000002"
    with open_store(store_url) as store:
        assert store.stats().acked == 2 * GROUPS  # iteration 2's groups were applied but never acked

    second = _driver(output, store_url, untrained_pocket_weights, "--resume")
    try:
        assert second.wait(timeout=300) == 0, (output.parent / "driver-resume.log").read_text()[-3000:]
    finally:
        _kill_group(second)

    rows = _rows(output)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))  # the killed process's later rows replaced
    assert [r["policy_version"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert [r["groups"] for r in rows] == [GROUPS] * ITERATIONS and sum(r["groups_dropped"] for r in rows) == 0
    # Applied once: the checkpoints' applied ids are exactly the tasks' ids, none twice.
    applied = _applied_by_checkpoints(output)
    assert sorted(applied) == sorted(expected) and len(set(applied)) == len(applied)
    with open_store(store_url) as store:
        stats = store.stats()
        assert all(store.is_applied(g) for g in expected)
    assert stats.acked == len(expected)  # each group acked (applied) once in the store, across both processes
    assert stats.queue_length == 0 and stats.pending == 0 and stats.dead_letters == 0
    assert (output / "config.yaml").is_file() and (output / "config.resume-1.yaml").is_file()
