"""Fetching the current adapter from the learner, as a (re)starting rollout worker does.

Kept free of model imports, so a simulated worker can use it without loading diffusers.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import ActorUnavailableError, OwnerDiedError


def pull_current_adapter(source: "ray.actor.ActorHandle", wait_s: float = 300.0) -> tuple[int, dict]:
    """(version, adapter tensors) from the learner, waiting while it restarts (its old object
    references die with its old process, so both the call and the fetch are made again)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            version, state_ref = ray.get(source.current_adapter.remote())
            return version, ray.get(state_ref)
        except (ActorUnavailableError, OwnerDiedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
