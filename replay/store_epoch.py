"""Store identity: the run epoch a store writes when it is created, and the error when it is gone.

A store's epoch is `<random hex id>@<UTC creation time>`. Every process that opens a store either
adopts its epoch (the driver, once per output directory) or is told the epoch to expect
(`StoreOptions.epoch`, in the store URL the driver hands to its actors). A store whose epoch is
missing or different is not the store this run wrote to: its queued groups, counters and applied
set are gone (Redis restarted without persistence, its keys deleted, the store directory replaced).
Recreating it silently would lose those groups and apply groups a second time, so every check
raises `StoreLostError`, and the Redis scripts that add to the queue, the applied set or the buffer
refuse to run under a different epoch.
"""

from __future__ import annotations

import time
import uuid

from replay.store import StoreLostError


def new_epoch() -> str:
    return f"{uuid.uuid4().hex}@{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


def lost_error(where: str, expected: str, found: str | None, seen_in: str) -> StoreLostError:
    state = "has no run epoch (it is empty or was recreated)" if found is None else f"has run epoch {found}"
    return StoreLostError(
        f"the replay store {where} {state}, but this run's store has epoch {expected} (noticed during {seen_in}): "
        "the store lost its data (e.g. Redis restarted without persistence, or its keys were deleted). "
        "Queued and pending groups, the counters and the applied set are gone; nothing more was written to it. "
        "Run Redis with persistence (appendonly yes). To continue from the newest checkpoint on this store, "
        "delete <output>/replay_epoch.json and run `python -m learner.main --resume --output <output>`: the "
        "applied set is rebuilt from the checkpoints, and the groups produced since the newest checkpoint are "
        "produced again (each is still applied once)."
    )


def check_epoch(where: str, expected: str | None, found: str | None, seen_in: str) -> None:
    if expected is not None and found != expected:
        raise lost_error(where, expected, found, seen_in)
