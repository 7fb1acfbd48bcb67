"""Where a scored candidate group goes: the learner's queue or the reference buffer, or nowhere."""

from __future__ import annotations

from replay.record import CandidateGroup
from replay.store import ReplayStore


def deliver_group(store: ReplayStore, group: CandidateGroup, destination: str, min_valid: int) -> tuple[bool, str]:
    """Push ``group`` to the queue (``destination == "queue"``) or add it to the reference buffer.

    Returns ``(stored, why not)``. A group with fewer than ``min_valid`` valid rewards is dropped: its
    advantages would be computed from too few scores to mean anything.
    """
    num_valid = int(group.reward_valid.sum())
    if num_valid < min_valid:
        return False, f"only {num_valid} valid rewards (< {min_valid})"
    if destination == "buffer":
        stored = store.buffer_add(group)
        return stored, "" if stored else "already in the buffer"
    stored = store.push(group) is not None
    return stored, "" if stored else "already applied"


def valid_reward_means(group: CandidateGroup, heads: tuple[str, ...]) -> dict[str, float]:
    """Each head's mean over the branches with a valid reward (NaN when none is valid)."""
    valid = group.reward_valid
    if not bool(valid.any()):
        return {h: float("nan") for h in heads}
    return {h: float(group.rewards[h][valid].mean()) for h in heads}
