"""The driver's side of the learner actor: one typed method per learner call, each made through one
fault-handling helper (`_call`), which takes the bound remote method itself, never its name.

Faults (docs/operations.md): the learner actor has `max_restarts`; a restarted learner restores its
newest checkpoint in its constructor and takes back the deliveries its previous process held. A call
it was serving is made again when the restored learner is where the call found it (e.g. the update
of the current iteration); when the restore went back further (updates after the checkpoint were
lost), `LearnerRestored` tells the driver to continue from the checkpoint's iteration, as `--resume`
would. With several learner ranks (`run.num_learners`) the actor is rank 0 of the group, which it manages:
a lost rank restarts the whole group from the newest checkpoint, met here as the restart of rank 0.
A replay store that stays unreachable past its own bounded retries (`ReplayUnavailableError`)
makes the driver wait for it (at most `store_outage_s`) and make the call again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from controller.rollout_fleet import wait_for_store
from learner.checkpoint import latest_checkpoint
from learner.messages import DriverState, LearnerStatus, Published, RestoreResult, UpdateStats
from replay import ReplayUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")
_CURRENT = object()  # `expect_iteration` default: the iteration the driver is at


class LearnerRestored(RuntimeError):
    """The learner restarted and restored a checkpoint older than the driver's position: the driver
    continues from `iteration` (the updates after that checkpoint were lost and are redone)."""

    def __init__(self, iteration: int, version: int, during: str):
        super().__init__(f"the learner restarted during {during} and restored iteration {iteration} (version {version})")
        self.iteration, self.version = iteration, version


class LearnerHandle:
    """The learner actor, the iteration the driver saw it finish, and the faults met calling it."""

    def __init__(self, actor: "ray.actor.ActorHandle", output: Path, store_url: str, *, store_outage_s: float = 600.0,
                 restart_timeout_s: float = 1800.0, max_call_attempts: int = 5,
                 placement: "PlacementGroup | None" = None) -> None:
        self.actor, self.output, self.store_url = actor, Path(output), store_url
        self.placement = placement  # the learner group's bundles, released at shutdown
        self.store_outage_s, self.restart_timeout_s, self.max_call_attempts = store_outage_s, restart_timeout_s, max_call_attempts
        self.iteration = 0  # iterations the learner has done, as the driver saw them
        self.version = 0  # the policy version after them
        self.restarts = 0  # restarts of the learner this driver has seen
        self.store_waits = 0  # learner calls that met an unreachable replay store

    # ------------------------------------------------------------------ the learner's calls
    def status(self) -> LearnerStatus:
        return self._call(self.actor.status, expect_iteration=None)

    def train_on_policy(self, num_groups: int, timeout_s: float) -> UpdateStats:
        return self._update(self.actor.train_on_policy, num_groups, timeout_s)

    def train_from_buffer(self, num_groups: int) -> UpdateStats:
        return self._update(self.actor.train_from_buffer, num_groups)

    def publish(self) -> Published:
        return self._call(self.actor.publish)

    def current_adapter(self) -> tuple[int, "ray.ObjectRef"]:
        return self._call(self.actor.current_adapter)

    def save_checkpoint(self, driver: DriverState) -> str:
        # A learner restarted at this very iteration restored the checkpoint this call was writing.
        done = lambda: str(latest_checkpoint(self.output / "checkpoints"))  # noqa: E731
        return self._call(self.actor.save_checkpoint, driver, already_done=done)

    def restore_latest(self) -> RestoreResult:
        restored = self._call(self.actor.restore_latest, expect_iteration=None)
        self.iteration, self.version = restored.iteration, restored.policy_version
        return restored

    def resync(self, restored: LearnerRestored) -> None:
        """After `LearnerRestored`: the driver continues from where the restored learner is."""
        self.iteration, self.version = restored.iteration, restored.version

    def shutdown(self) -> None:
        """End the learner (and the ranks it started) and release the learner group's bundles."""
        ray.kill(self.actor, no_restart=True)
        if self.placement is not None:
            remove_placement_group(self.placement)

    # ------------------------------------------------------------------ fault handling
    def _update(self, train: "ray.actor.ActorMethod", *args) -> UpdateStats:
        """One iteration's update, after checking that the learner did not restart unseen."""
        during = _name(train)
        status = self.status()
        if status.iteration != self.iteration:
            self.restarts += 1
            raise LearnerRestored(status.iteration, status.version, during)
        stats = self._call(train, *args)
        if stats.policy_version != self.version + 1:  # restarted between the check and the call
            status = ray.get(self.actor.status.remote())
            raise LearnerRestored(status.iteration, status.version, during)
        self.iteration += 1
        self.version = stats.policy_version
        return stats

    def _call(self, method: "ray.actor.ActorMethod", *args, expect_iteration: object = _CURRENT,
              already_done: Callable[[], T] | None = None):
        """`method.remote(*args)`, made again after a learner restart that restored the state the call
        started from, or after an outage of the replay store; bounded by `max_call_attempts`."""
        expected = self.iteration if expect_iteration is _CURRENT else expect_iteration
        last: Exception | None = None
        for _ in range(self.max_call_attempts):
            try:
                return ray.get(method.remote(*args))
            except RayActorError as err:
                last = err
                status = self._await_restart()
                self.restarts += 1
                if expected is not None and status.iteration != expected:
                    raise LearnerRestored(status.iteration, status.version, _name(method)) from err
                log.warning("the learner restarted during %s and restored iteration %d; calling again", _name(method), status.iteration)
                if already_done is not None:
                    return already_done()
            except RayTaskError as err:
                if not isinstance(err.cause, ReplayUnavailableError):
                    raise
                last = err.cause
                self.store_waits += 1
                log.warning("learner %s met an unreachable replay store (%s); waiting for it", _name(method), err.cause)
                wait_for_store(self.store_url, self.store_outage_s, "the learner cannot pull or ack groups")
        raise RuntimeError(f"learner call {_name(method)} failed {self.max_call_attempts} times; last error: {last}") from last

    def _await_restart(self) -> LearnerStatus:
        """Wait for Ray to restart the learner (its constructor restores the newest checkpoint)."""
        start = time.monotonic()
        deadline = start + self.restart_timeout_s
        status = self.actor.status.remote()
        while True:
            try:
                return ray.get(status, timeout=min(30.0, max(1.0, deadline - time.monotonic())))
            except GetTimeoutError as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"the learner did not come back within {self.restart_timeout_s}s") from err
                log.warning("waiting %.0fs for the learner to restart (its node or its resources may be missing)",
                            time.monotonic() - start)
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                status = self.actor.status.remote()
            except ActorDiedError as err:
                raise RuntimeError(
                    "the learner died and Ray did not restart it (restarts spent, or its node is gone for good); "
                    f"continue with `python -m learner.main --resume --output {self.output}`"
                ) from err


def _name(method: "ray.actor.ActorMethod") -> str:
    """The learner call's name, for messages only."""
    return getattr(method, "_method_name", None) or str(method)
