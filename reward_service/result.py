"""The per-sample outcome of scoring one video."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardResult:
    """Scores of one video: every head of every reward model, a validity flag and, if invalid, why.

    `scores` always holds every head; a head that could not be scored is NaN there (never 0).
    `valid` is False when any head is missing or not finite; `reason` then says which and why.
    `scored_by` names the actor (or process) that produced the result, for tracing.
    """

    scores: dict[str, float]
    valid: bool
    reason: str | None = None
    scored_by: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.valid and self.reason is not None:
            raise ValueError(f"a valid RewardResult carries no reason, got {self.reason!r}")
        if not self.valid and not self.reason:
            raise ValueError("an invalid RewardResult must say why (reason)")
        if self.valid and not all(math.isfinite(v) for v in self.scores.values()):
            raise ValueError(f"a valid RewardResult has only finite scores, got {self.scores}")

    @classmethod
    def invalid(cls, heads: tuple[str, ...], reason: str, scored_by: str = "") -> RewardResult:
        """A result with NaN in every head."""
        return cls({h: math.nan for h in heads}, False, reason, scored_by)
