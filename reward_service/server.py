"""The reward pool as a service other actors call: one threaded Ray actor in front of `RewardPool`.

Rollout workers call `score_ref(videos_ref, prompts)` concurrently (the actor runs up to
`max_concurrency` calls at once); their batches share the pool's reward actors, so two workers'
groups are scored side by side rather than one after the other. Frames stay in the object store:
only the reference passes through this actor.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray

from reward_service.pool import RewardPool, RewardSpec
from reward_service.result import RewardResult


class RewardServer:
    def __init__(self, rewards: Sequence[RewardSpec | str | tuple[str, dict]], num_actors: int = 1, **pool_options) -> None:
        self.pool = RewardPool(rewards, num_actors, **pool_options)

    def heads(self) -> tuple[str, ...]:
        return self.pool.heads

    def score_ref(self, videos_ref: list, prompts: list[str]) -> list[RewardResult]:
        # A reference wrapped in a list is not resolved by Ray on the way in, so no frame reaches this actor.
        (ref,) = videos_ref if isinstance(videos_ref, list) else (videos_ref,)
        return self.pool.score_ref(ref, prompts)

    def resize(self, num_actors: int) -> int:
        self.pool.resize(num_actors)
        return self.pool.num_actors

    def num_actors(self) -> int:
        return self.pool.num_actors

    def metrics(self) -> dict:
        return self.pool.metrics()

    def shutdown(self) -> None:
        self.pool.shutdown()


def remote_score(server: "ray.actor.ActorHandle", videos: list, prompts: list[str]) -> list[RewardResult]:
    """Put `videos` in the object store once and score them through `server`."""
    return ray.get(server.score_ref.remote([ray.put(videos)], prompts))
