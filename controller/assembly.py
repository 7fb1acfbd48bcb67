"""Start-up: Ray, the replay store's address, the reward server, the learner actor (rank 0 of the learner
group, in a placement group with a bundle per rank) and the rollout fleet, at the counts of the output
directory's scale request (if there is one, else the config's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from controller.fleet_scaling import read_request
from controller.ray_cluster import init_ray
from controller.rollout_fleet import RolloutFleet
from controller.store_identity import pin_store_epoch
from controller.config import Config
from learner.learner_actor import Learner
from replay import URL_ENV as REPLAY_URL_ENV, with_store_option
from reward_service.server import RewardServer
from rollout_workers.worker import RolloutWorker


@dataclass(frozen=True)
class Assembly:
    """The started actors, ready: the learner has published its adapter, the fleet has loaded it."""

    store_url: str
    reward_server: "ray.actor.ActorHandle"
    learner: "ray.actor.ActorHandle"
    fleet: RolloutFleet
    corrupt_before: int  # corrupt records the store held already: a resumed run counts only its own
    learner_placement: PlacementGroup | None = None  # the learner group's bundles (run.num_learners > 1)


def assemble(
    config: Config,
    output: Path,
    *,
    worker_cls: type = RolloutWorker,
    worker_kwargs: dict | None = None,
    worker_options: dict | None = None,
    learner_cls: type = Learner,
    learner_max_restarts: int = 3,
) -> Assembly:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rollout, reward = config.rollout, config.reward
    request, _ = read_request(output)
    num_workers = (request and request.rollout_workers) or rollout.num_workers
    num_reward_actors = (request and request.reward_actors) or reward.num_actors
    init_ray(num_workers * rollout.num_cpus_per_worker + num_reward_actors + config.run.num_learners, config.run.dashboard_port)
    store_url, corrupt_before = _store_url(config, output)
    # Restarted by Ray with its calls retried: a lost scoring call is simply made again.
    reward_server = ray.remote(RewardServer).options(max_concurrency=64, num_cpus=0, max_restarts=3, max_task_retries=3).remote(
        [(reward.model, reward.options)],
        num_actors=num_reward_actors,
        batch_size=reward.batch_size,
        num_gpus=reward.num_gpus_per_actor,
        timeout_s=reward.timeout_s,
        resources=reward.resources or None,
    )
    placement, scheduling = _learner_placement(config)
    learner = (
        ray.remote(learner_cls)
        .options(num_cpus=1, num_gpus=config.run.learner_num_gpus, resources=config.run.learner_resources or None,
                 max_restarts=learner_max_restarts, max_task_retries=0, **scheduling)
        .remote(config.learner_settings().model_dump(mode="json"), store_url, str(output / "checkpoints"))
    )
    # The workers start while the learner builds its policy; they pull its adapter when it is ready.
    fleet = RolloutFleet(config, reward_server, store_url, learner, num_workers, worker_cls=worker_cls,
                         worker_options=worker_options, worker_kwargs=worker_kwargs, wait=False)
    ray.get(learner.publish.remote())
    fleet.wait_ready()
    return Assembly(store_url, reward_server, learner, fleet, corrupt_before, placement)


def _learner_placement(config: Config) -> tuple[PlacementGroup | None, dict]:
    """With several learner ranks: a placement group of one bundle per rank (its CPU, GPU and custom
    resources), reserved together, and the scheduling option that puts rank 0 (this actor) in bundle 0;
    rank 0 starts rank r in bundle r. A bundle holds its own GPU, so ranks never share one; PACK puts the
    bundles on as few nodes as fit (NCCL within a node is the fast path) without refusing to spread them
    when no node has room for all, as STRICT_PACK would."""
    run = config.run
    if run.num_learners == 1:
        return None, {}
    bundle = {"CPU": 1.0, **({"GPU": run.learner_num_gpus} if run.learner_num_gpus else {}), **run.learner_resources}
    placement = placement_group([dict(bundle) for _ in range(run.num_learners)], strategy="PACK")
    strategy = PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=False)
    return placement, {"scheduling_strategy": strategy}


def _store_url(config: Config, output: Path) -> tuple[str, int]:
    """The replay store's URL every actor opens (with the configured queue bound and the run's store
    epoch pinned), and the corrupt records the store holds already."""
    base_url = config.replay.url or os.environ.get(REPLAY_URL_ENV) or (output / "replay").resolve().as_uri()
    store_url = with_store_option(base_url, "max_queue_len", config.replay.max_queue_groups)
    store_url, stats = pin_store_epoch(store_url, output)  # every actor checks the run's store epoch
    return store_url, stats.corrupt
