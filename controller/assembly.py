"""Start-up: Ray, the replay store's address, the reward server, the learner actor and the rollout
fleet, at the counts of the output directory's scale request (if there is one, else the config's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray

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
    init_ray(num_workers * rollout.num_cpus_per_worker + num_reward_actors + 1, config.run.dashboard_port)
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
    learner = (
        ray.remote(learner_cls)
        .options(num_cpus=1, num_gpus=config.run.learner_num_gpus, resources=config.run.learner_resources or None,
                 max_restarts=learner_max_restarts, max_task_retries=0)
        .remote(config.learner_settings().model_dump(mode="json"), store_url, str(output / "checkpoints"))
    )
    # The workers start while the learner builds its policy; they pull its adapter when it is ready.
    fleet = RolloutFleet(config, reward_server, store_url, learner, num_workers, worker_cls=worker_cls,
                         worker_options=worker_options, worker_kwargs=worker_kwargs, wait=False)
    ray.get(learner.publish.remote())
    fleet.wait_ready()
    return Assembly(store_url, reward_server, learner, fleet, corrupt_before)


def _store_url(config: Config, output: Path) -> tuple[str, int]:
    """The replay store's URL every actor opens (with the configured queue bound and the run's store
    epoch pinned), and the corrupt records the store holds already."""
    base_url = config.replay.url or os.environ.get(REPLAY_URL_ENV) or (output / "replay").resolve().as_uri()
    store_url = with_store_option(base_url, "max_queue_len", config.replay.max_queue_groups)
    store_url, stats = pin_store_epoch(store_url, output)  # every actor checks the run's store epoch
    return store_url, stats.corrupt
