"""One on-policy run on a local multi-node Ray cluster, with every fault of the issue staged in it.

The real driver (`controller.driver.train`), System, rollout fleet, reward server and pool, learner actor
(pocket model, untrained weights) and Redis replay store; the rollout workers are simulated
(fixed compute time, valid pocket-sized groups). Redis is a throwaway `redis-server` on a free port
with an append-only file, restarted by this module whenever a drill stops it. Drills (drills.py) fire
once each, armed before the iteration that meets them:

    it  drill                                                     what must hold
    0   a rollout worker dies before pushing group 0              the group is produced again, same id
    1   a worker dies right after pushing group 1 (pushed twice);  applied once; the batch is retried;
        a reward actor dies mid-batch; the fleet is scaled to      the learner keeps training; the
        3 workers and the pool to 2 reward actors; no node has     third worker waits, then starts on
        room for the third worker until one joins after it         the node that joined
    2   the learner dies in its update                            restored checkpoint, update made again
    3   the learner dies after checkpoint 4, before its acks      the checkpoint stands; acked later
    4   Redis stops before a worker pushes                        the fleet waits, the task runs again
    5   the learner dies in its update, its checkpoint is older   the driver continues from iteration 4
    6   Redis stops before the learner pulls                      the driver waits, the update is made
    7   Redis stops as the final checkpoint is written            its acks fail; the call is made again

Counted from independent sources: the task ids the sampler gives, Redis' applied set and counters,
the applied group ids in the checkpoints, metrics.jsonl and the Prometheus text of the live run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the drills modules, also on the Ray processes' PYTHONPATH (below)

from drill_learner import DrillLearner  # noqa: E402
from drills import CRASH_REWARD, arm, armed  # noqa: E402
from drills import DrillRolloutWorker  # noqa: E402

from controller.config import load_config  # noqa: E402
from controller.driver import train  # noqa: E402
from controller.scale import request_scale  # noqa: E402
from controller.task_sampler import TaskSampler, load_prompts  # noqa: E402
from pocket.preset import new_transformer, save_pocket_weights  # noqa: E402
from replay import open_store  # noqa: E402
from rollout_workers.simulated import preset_geometry  # noqa: E402

ITERATIONS = 8
GROUPS = 2  # per iteration
REDIS_OUTAGE_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayRedis:
    """redis-server on a free port (never 6379) with an fsync'ed append-only file, started again
    REDIS_OUTAGE_S after each time it stops."""

    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            raise RuntimeError("the fault tests need redis-server on PATH (the Redis the project's tests use)")
        self.port = _free_port()
        assert self.port != 6379
        self.workdir = workdir
        self.restarts = 0
        self._stop = threading.Event()
        self.proc = self._launch()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _launch(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return proc
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "throwaway redis-server did not start"
                time.sleep(0.05)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            if self.proc.poll() is not None:
                time.sleep(REDIS_OUTAGE_S)
                if self._stop.is_set():
                    return
                self.proc = self._launch()
                self.restarts += 1
            time.sleep(0.05)

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=REDIS_OUTAGE_S + 5)
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass
class DrilledRun:
    rows: list[dict]
    output: Path
    store_url: str
    expected_ids: list[str]
    metrics_ports: list[int]
    head_node_id: str
    joined_node_id: str = ""
    after: dict[int, dict] = field(default_factory=dict)  # what the callback saw after each iteration
    restarts_of_redis: int = 0
    stats: dict = field(default_factory=dict)
    applied_in_store: dict[str, bool] = field(default_factory=dict)


def _observe(system, row: dict) -> dict:
    return {
        "at": time.monotonic(),
        "row": row,
        "version": system.version,
        "fleet_size": system.fleet.size,
        "fleet_failures": system.fleet.failures,
        "store_waits": system.fleet.store_waits + system.store_waits,
        "learner_restarts": system.learner_restarts,
        "workers": system.fleet.infos(),
        "reward_actors": ray.get(system.reward_server.num_actors.remote()),
        "reward_pool": ray.get(system.reward_server.metrics.remote()),
        "learner_status": ray.get(system.learner.actor.status.remote()),
        "produced": dict(system.metrics.snapshot().get("arcopo_groups_produced_total", {})),
    }


@pytest.fixture(scope="module")
def drilled_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("drilled")
    redis_server = ThrowawayRedis(base)
    metrics_ports = [_free_port(), _free_port()]
    env = {"PYTHONPATH": str(HERE), "RAY_metrics_report_interval_ms": "1000"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "resources": {"learner_slot": 1}, "include_dashboard": False,
                            "gcs_server_port": _free_port(), "metrics_export_port": metrics_ports[0]},
        )
        # Room for two rollout workers (one rollout_slot each) and two reward actors; a third node joins mid-run.
        cluster.add_node(num_cpus=3, resources={"rollout_slot": 2}, metrics_export_port=metrics_ports[1])
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield _run(base, redis_server, metrics_ports, cluster)
        finally:
            ray.shutdown()
            cluster.shutdown()
            redis_server.close()


def _run(base: Path, redis_server: ThrowawayRedis, metrics_ports: list[int], cluster: Cluster) -> DrilledRun:
    weights = save_pocket_weights(new_transformer(0), base / "weights", {})
    output, store_url = base / "run", redis_server.url("drilled:")
    drill_dir = output / "drills"
    config = load_config(None, [
        f"run.iterations={ITERATIONS}", "run.checkpoint_every=2", "run.eval_every=0", "run.eval_prompts_limit=2",
        f"algorithm.groups_per_iteration={GROUPS}", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
        "algorithm.updates_per_iteration=1", "lora.rank=2", "lora.alpha=4",
        f"policy.transformer_checkpoint={weights}",
        "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.5", "rollout.resources={rollout_slot: 1}",
        "run.learner_resources={learner_slot: 1}",
        f"reward.model={CRASH_REWARD}", f"reward.options={{cost_s: 0.2, drill_dir: '{drill_dir}'}}",
        "reward.num_actors=1", "reward.batch_size=4", "reward.timeout_s=60",
        f"replay.url='{store_url}'",
    ])
    sampler = TaskSampler(config, load_prompts(config.rollout.prompts), 4, output.name)
    ids = {i: [t.group_id for t in sampler.tasks(i, GROUPS)] for i in range(ITERATIONS)}
    staged = {  # armed after the iteration before
        -1: [("worker-before-push", ids[0][0])],
        0: [("worker-after-push", ids[1][1]), ("reward-mid-batch", "any")],
        1: [("learner-in-update", 2)],
        2: [("learner-before-acks", 4)],
        3: [("redis-down-before-push", ids[4][0])],
        4: [("learner-in-update", 5)],
        5: [("redis-down-before-pull", 6)],
        6: [("redis-down-in-checkpoint", ITERATIONS)],
    }
    run = DrilledRun([], output, store_url, [g for i in range(ITERATIONS) for g in ids[i]], metrics_ports,
                     cluster.head_node.node_id)

    def on_iteration(system, row):
        i = row["iteration"]
        if i in run.after:  # a redone iteration (after the learner went back to a checkpoint)
            run.after[i]["redone"] = _observe(system, row)
            return
        run.after[i] = _observe(system, row)
        for point, key in staged.get(i, []):
            arm(drill_dir, point, key)
        if i == 0:
            request_scale(output, rollout_workers=3, reward_actors=2)
        if i == 1:  # the third worker has been waiting for a rollout_slot through iteration 1
            run.joined_node_id = cluster.add_node(num_cpus=1, resources={"rollout_slot": 1},
                                                  metrics_export_port=_free_port()).node_id

    for point, key in staged[-1]:
        arm(drill_dir, point, key)
    run.rows = train(
        config, output, on_iteration=on_iteration,
        worker_cls=DrillRolloutWorker,
        worker_kwargs={"drill_dir": str(drill_dir), "compute_s": 0.2, "geometry": preset_geometry("pocket")},
        learner_cls=DrillLearner,
    )
    assert armed(drill_dir) == [], "every staged fault fired"
    run.restarts_of_redis = redis_server.restarts
    with open_store(store_url) as store:
        run.stats = store.stats().model_dump()
        run.applied_in_store = {g: store.is_applied(g) for g in run.expected_ids}
    return run


def _applied_by_checkpoints(output: Path) -> list[str]:
    """The applied group ids of every checkpoint, in order (each lists those since the one before)."""
    ids = []
    for path in sorted((output / "checkpoints").glob("iter_*")):
        ids.extend(json.loads((path / "state.json").read_text())["applied_group_ids"])
    return ids


def test_run_finishes_with_every_group_applied_exactly_once(drilled_run):
    run = drilled_run
    assert [r["iteration"] for r in run.rows] == list(range(ITERATIONS))
    assert [r["policy_version"] for r in run.rows] == list(range(1, ITERATIONS + 1))
    # Consumed: each iteration trained on its 2 groups, none dropped (a failed reward batch would drop one).
    assert [r["groups"] for r in run.rows] == [GROUPS] * ITERATIONS
    assert sum(r["groups_dropped"] for r in run.rows) == 0
    # Applied once: the checkpoints' applied ids are exactly the tasks' ids, none twice.
    applied = _applied_by_checkpoints(run.output)
    assert sorted(applied) == sorted(run.expected_ids) and len(set(applied)) == len(applied)
    # None lost: Redis marks every group applied, acked each once, and holds nothing unacked.
    assert all(run.applied_in_store.values())
    assert run.stats["acked"] == len(run.expected_ids)
    assert run.stats["queue_length"] == 0 and run.stats["pending"] == 0
    assert run.stats["corrupt"] == 0 and run.stats["dead_letters"] == 0


def test_rollout_worker_killed_mid_group_produces_it_again_under_the_same_id(drilled_run):
    run = drilled_run
    first = run.after[0]
    assert first["fleet_failures"] >= 1  # the group of the worker that died was handed out again
    assert first["row"]["groups"] == GROUPS
    # Died after its push: the group is in the queue twice (2 pushes), applied once.
    second = run.after[1]
    assert second["fleet_failures"] >= first["fleet_failures"] + 1
    # 8 iterations + 2 redone = 20 rollouts of groups; 21 pushes (one twice); the second copies of
    # iterations 4 and 5's groups and of the double push were skipped as already applied.
    produced = sum(run.after[ITERATIONS - 1]["produced"].values())
    assert produced == GROUPS * (ITERATIONS + 2)
    assert run.stats["pushed"] == produced + 1
    # Every copy beyond the first of a group left the queue as a duplicate (queue empty, acked once).
    assert run.stats["duplicates_skipped"] <= run.stats["pushed"] - run.stats["acked"]


def test_reward_actor_killed_mid_batch_has_its_batch_retried(drilled_run):
    pool = drilled_run.after[1]["reward_pool"]
    assert pool["actor_failures"] >= 1 and pool["batches_retried"] >= 1
    assert pool["batches_failed"] == 0
    assert drilled_run.after[1]["row"]["groups_dropped"] == 0


def test_learner_killed_and_resumed_from_its_checkpoint(drilled_run):
    run = drilled_run
    # Iteration 2: died in the update; restored checkpoint 2 (where the call found it), call made again.
    assert run.after[2]["learner_restarts"] == 1 and run.after[2]["version"] == 3
    # Iteration 3: died after writing checkpoint 4, before acking; the checkpoint stands.
    assert run.after[3]["learner_restarts"] == 2 and run.after[3]["learner_status"].iteration == 4
    # Iteration 5: died in the update with checkpoint 4 as its newest: iterations 4 and 5 were redone.
    assert run.after[5]["learner_restarts"] == 3
    assert "redone" in run.after[4] and run.after[4]["redone"]["version"] == 5
    assert [r["iteration"] for r in run.rows] == list(range(ITERATIONS))  # the lost row was replaced


def test_redis_restarted_under_on_policy_run(drilled_run):
    run = drilled_run
    assert run.restarts_of_redis == 3
    # Iteration 4 (a worker's push), 6 (the learner's pull), 7 (the learner's acks) met the outage.
    assert run.after[4]["store_waits"] >= 1
    assert run.after[6]["store_waits"] > run.after[5]["store_waits"]
    assert run.after[7]["store_waits"] > run.after[6]["store_waits"]


def test_scaled_mid_run_without_touching_the_learner(drilled_run):
    run = drilled_run
    later = run.after[1]
    assert later["fleet_size"] == 3 and later["reward_actors"] == 2
    assert "rollout-2" not in {w.name for w in later["workers"]}  # no node had room for it yet
    assert later["learner_restarts"] == 0 and later["version"] == 2  # the learner kept training
    # The node that joined after iteration 1 got the waiting worker (the third one, or one that Ray
    # restarted while the third took its slot) and the three took tasks.
    assert len(run.after[3]["workers"]) == 3
    assert run.joined_node_id in {w.node_id for i in (2, 3, 4) for w in run.after[i]["workers"]}
    assert run.after[4]["produced"].get((("worker", "rollout-2"),), 0) > 0
    final = run.after[ITERATIONS - 1]
    names = {w.name for w in final["workers"]}
    assert len(names) == 3
    assert {w.version for w in final["workers"]} == {ITERATIONS}  # all hold the learner's adapter
    # Workers run on rollout nodes (rollout_slot), the learner on the head (learner_slot).
    assert all(w.node_id != run.head_node_id for w in final["workers"])


def _scrape(ports: list[int]) -> dict[tuple[str, frozenset], float]:
    """Our series from every node's endpoint, summed over nodes and processes, Ray's labels dropped."""
    text = "\n".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode() for p in ports)
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line.startswith("ray_arcopo_"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        assert m, line
        name, labels_text, value = m.groups()
        labels = frozenset((k, v) for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels_text or "")
                           if k not in ray_labels and not k.startswith("otel_"))
        out[(name, labels)] = out.get((name, labels), 0.0) + float(value)
    return out


def test_live_run_metrics_in_prometheus_text(drilled_run):
    run = drilled_run
    final = run.after[ITERATIONS - 1]
    produced = {dict(k)["worker"]: v for k, v in final["produced"].items()}
    expected = {
        ("ray_arcopo_iteration", frozenset()): ITERATIONS - 1,
        ("ray_arcopo_policy_version", frozenset()): ITERATIONS,
        ("ray_arcopo_rollout_workers", frozenset()): 3,
        ("ray_arcopo_reward_actors", frozenset()): 2,
        # Rollouts: 8 iterations + the 2 redone; updates: 8 + the one whose checkpoint was lost.
        ("ray_arcopo_phase_seconds_count", frozenset({("phase", "rollout")})): ITERATIONS + 2,
        ("ray_arcopo_phase_seconds_count", frozenset({("phase", "update")})): ITERATIONS + 1,
        ("ray_arcopo_groups_consumed_total", frozenset()): GROUPS * (ITERATIONS + 1),
        **{("ray_arcopo_groups_produced_total", frozenset({("worker", w)})): n for w, n in produced.items()},
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            scraped = _scrape(run.metrics_ports)
        except OSError:
            scraped = {}
        wrong = {k: (v, scraped.get(k)) for k, v in expected.items() if scraped.get(k) != v}
        if not wrong:
            break
        assert time.monotonic() < deadline, f"live metrics missing or wrong: {wrong}"
        time.sleep(0.5)
    assert math.isfinite(scraped[("ray_arcopo_loss", frozenset())])
    assert scraped[("ray_arcopo_broadcast_bytes_total", frozenset())] > 0
