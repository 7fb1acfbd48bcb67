"""Held-out scores and their tables: one `Scores` per evaluated model, aggregated over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from experiments.report import markdown_table
from experiments.stats import Stat, mean_spread
from controller.evaluation import EvalSummary

HEADS = ("TA", "VQ", "MQ")  # the paper's Table 2 order
COLUMNS = (*HEADS, "Overall", "FVD")


@dataclass(frozen=True)
class Scores:
    heads: dict[str, float]
    overall: float  # TA + VQ + MQ
    fvd: float  # FVD-p, lower is better
    invalid: int = 0

    def value(self, column: str) -> float:
        return {"Overall": self.overall, "FVD": self.fvd}.get(column, self.heads.get(column, float("nan")))

    def row(self) -> dict:
        return {c: self.value(c) for c in COLUMNS} | {"invalid": self.invalid}

    def summary(self) -> EvalSummary:
        """As `learner.merge` sees a candidate (for its selection rule: reward up, out-of-domain metric down)."""
        return EvalSummary(dict(self.heads), self.overall, self.fvd, self.invalid)


def aggregate(scores: Sequence[Scores]) -> dict[str, Stat]:
    """Mean and spread over seeds of every column."""
    return {c: mean_spread([s.value(c) for s in scores]) for c in COLUMNS}


def scores_table(label_header: str, models: Mapping[str, Sequence[Scores]], extra: Mapping[str, Sequence[str]] | None = None,
                 extra_header: Sequence[str] = ()) -> str:
    """A markdown table: one row per model, TA | VQ | MQ | Overall | FVD-p as mean ± spread (n seeds)."""
    header = [label_header, "seeds", *HEADS, "Overall", "FVD-p (lower is better)", *extra_header]
    rows = []
    for label, scores in models.items():
        stats = aggregate(scores)
        cells = [label, str(len(scores)), *(stats[c].fmt() for c in HEADS), stats["Overall"].fmt(), stats["FVD"].fmt(2)]
        rows.append(cells + list((extra or {}).get(label, [""] * len(extra_header))))
    return markdown_table(header, rows)
