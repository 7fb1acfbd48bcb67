"""Independent scaling: the scale request file and its command, and a rollout fleet that grows onto a
node joining a local Ray cluster in the middle of a rollout.

(Scaling a whole run mid-flight, with the learner untouched, is part of tests/faults/test_drilled_run.py.)
"""

from __future__ import annotations

import json
import socket

import pytest
import ray
from ray.cluster_utils import Cluster

from learner.config import load_config
from learner.rollout_fleet import RolloutFleet
from learner.scale import SCALE_FILE, ScaleRequestError, main as scale_main, read_scale_request, request_scale
from replay import open_store
from rollout_workers.simulated import SimulatedRolloutWorker
from rollout_workers.tasks import RolloutTask

GEOMETRY = dict(channels=4, height=4, width=4, frames_per_chunk=1, num_chunks=2, num_steps=2)


def test_scale_request_keeps_counts_not_named_again(tmp_path):
    assert read_scale_request(tmp_path) is None
    first = request_scale(tmp_path, rollout_workers=4)
    assert (first.rollout_workers, first.reward_actors) == (4, None)
    second = request_scale(tmp_path, reward_actors=2)
    assert (second.rollout_workers, second.reward_actors) == (4, 2)
    on_disk = read_scale_request(tmp_path)
    assert (on_disk.rollout_workers, on_disk.reward_actors) == (4, 2)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_scale_command_validates_and_shows(tmp_path, capsys):
    assert scale_main(["--output", str(tmp_path), "--rollout-workers", "3"]) == 0
    assert json.loads((tmp_path / SCALE_FILE).read_text())["rollout_workers"] == 3
    assert scale_main(["--output", str(tmp_path), "--rollout-workers", "0"]) == 2
    assert "rollout_workers" in capsys.readouterr().err
    assert read_scale_request(tmp_path).rollout_workers == 3  # a refused request changes nothing
    assert scale_main(["--output", str(tmp_path / "missing"), "--reward-actors", "2"]) == 2
    assert scale_main(["--output", str(tmp_path)]) == 2  # nothing asked for
    assert scale_main(["--output", str(tmp_path), "--show"]) == 0
    assert '"rollout_workers":3' in capsys.readouterr().out


def test_broken_scale_file_names_the_file_and_field(tmp_path):
    (tmp_path / SCALE_FILE).write_text('{"rollout_workers": "many"}')
    with pytest.raises(ScaleRequestError, match=r"scale\.json: rollout_workers"):
        read_scale_request(tmp_path)
    (tmp_path / SCALE_FILE).write_text("{not json")
    with pytest.raises(ScaleRequestError, match="not JSON"):
        read_scale_request(tmp_path)


@ray.remote(num_cpus=0)
class AdapterSource:
    """Stands in for the learner: the adapter version a (re)started worker pulls."""

    def __init__(self, version: int):
        self.version, self.ref = version, ray.put({})

    def current_adapter(self):
        return self.version, self.ref


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"rollout_slot": 1}, "include_dashboard": False, "gcs_server_port": _free_port()})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_fleet_grows_onto_a_node_that_joins_mid_rollout(one_node_cluster, tmp_path):
    cluster = one_node_cluster
    config = load_config(None, ["rollout.num_cpus_per_worker=0.5", "rollout.resources={rollout_slot: 1}"])
    store_url = (tmp_path / "replay").as_uri()
    source = AdapterSource.remote(7)
    fleet = RolloutFleet(config, None, store_url, source, num_workers=1, worker_cls=SimulatedRolloutWorker,
                         worker_kwargs={"compute_s": 0.3, "reward": "stand-in", "geometry": GEOMETRY})
    fleet.resize(2, wait=False)  # one rollout_slot only: the second worker waits for a node
    assert (fleet.size, fleet.ready_size) == (2, 1)

    joined = {}

    def add_node_once():  # called by the fleet about once a second while it runs the tasks
        if not joined:
            joined["node"] = cluster.add_node(num_cpus=1, resources={"rollout_slot": 1})
            waiting = fleet.members[1].handle
            ray.get(waiting.info.remote(), timeout=300)  # hold the rollout until the new worker is up

    tasks = [RolloutTask(group_id=f"join-{k}", prompt="a red circle", noise_seed=k, pivot=k % 2, group_size=2,
                         sigma=0.5, adapter_name="on_policy") for k in range(8)]
    summaries = fleet.run(tasks, on_tick=add_node_once)
    assert [s.group_id for s in summaries] == [t.group_id for t in tasks] and all(s.stored for s in summaries)
    by_worker = {w: sum(s.worker == w for s in summaries) for w in ("rollout-0", "rollout-1")}
    assert by_worker["rollout-1"] > 0, by_worker  # the new worker took tasks in the same rollout
    infos = {i["name"]: i for i in fleet.infos()}
    assert infos["rollout-1"]["node_id"] == joined["node"].node_id != infos["rollout-0"]["node_id"]
    assert {i["version"] for i in infos.values()} == {7}  # each pulled the current adapter as it started
    with open_store(store_url) as store:
        assert store.stats().pushed == len(tasks)

    fleet.resize(1)  # shrinking keeps one worker and retires the other
    assert fleet.size == 1 and len(fleet.infos()) == 1
