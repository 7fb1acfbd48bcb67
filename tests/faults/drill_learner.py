"""The learner with fault drills (see drills.py); its own module, since only the learner process
should pay for importing the model code."""

from __future__ import annotations

from pathlib import Path

from drills import fire, shutdown_redis, take
from learner.learner_actor import Learner


class DrillLearner(Learner):
    """Drills keyed by the learner's iteration counter i (iterations it has finished), in
    `<output>/drills` (the checkpoint root's sibling):

    - `learner-in-update@i`: dies in the update, after pulling its groups;
    - `learner-in-publish@i`: dies publishing the adapter after update i-1 (before its checkpoint);
    - `learner-before-acks@i`: dies after writing checkpoint i, before acking its groups;
    - `redis-down-before-pull@i`: stops Redis before the pull of update i;
    - `redis-down-in-checkpoint@i`: stops Redis as checkpoint i is written, before its acks;
    - `learner-rank1-in-update@i`: rank 1 of a learner group dies in update i, before its first gradient sum.
    """

    def __init__(self, config: dict, store_url: str, checkpoint_root: str, consumer: str = "learner-0",
                 rank: int = 0) -> None:
        self.drill_dir = Path(checkpoint_root).parent / "drills"
        self.store_url = store_url
        super().__init__(config, store_url, checkpoint_root, consumer, rank)

    def _guarded_step(self, loss, group_ids):
        if self.rank > 0:
            fire(self.drill_dir, f"learner-rank{self.rank}-in-update", self.iteration)
        return super()._guarded_step(loss, group_ids)

    def _pull_on_policy(self, num_groups, timeout_s):
        if take(self.drill_dir, "redis-down-before-pull", self.iteration):
            shutdown_redis(self.store_url)
        return super()._pull_on_policy(num_groups, timeout_s)

    def train_groups(self, groups):
        fire(self.drill_dir, "learner-in-update", self.iteration)
        return super().train_groups(groups)

    def publish(self):
        fire(self.drill_dir, "learner-in-publish", self.iteration)
        return super().publish()

    def save_checkpoint(self, extra=None):
        if take(self.drill_dir, "redis-down-in-checkpoint", self.iteration):
            shutdown_redis(self.store_url)
        if (self.drill_dir / f"learner-before-acks@{self.iteration}").exists():
            ack = self.store.ack

            def ack_or_die(delivery):
                fire(self.drill_dir, "learner-before-acks", self.iteration)  # the checkpoint is on disk
                return ack(delivery)

            self.store.ack = ack_or_die
        return super().save_checkpoint(extra)
