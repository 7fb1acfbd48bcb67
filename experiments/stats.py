"""Aggregation over seeds: means, spreads, curves per iteration, start-vs-end changes, trends.

Spread is the sample standard deviation over seeds (ddof = 1); with one seed it is undefined (NaN)
and tables print the mean alone. NaN values (a head missing from a row) are left out of each mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stat:
    mean: float
    spread: float  # sample std over seeds; NaN for fewer than two values
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a"
        if self.n < 2 or not math.isfinite(self.spread):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.spread:.{digits}f}"

    @property
    def standard_error(self) -> float:
        return self.spread / math.sqrt(self.n) if self.n >= 2 else math.nan


def mean_spread(values: Sequence[float]) -> Stat:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return Stat(math.nan, math.nan, 0)
    spread = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
    return Stat(float(finite.mean()), spread, int(finite.size))


@dataclass(frozen=True)
class Curve:
    iterations: np.ndarray  # [I]
    mean: np.ndarray  # [I]
    spread: np.ndarray  # [I] (NaN where fewer than two seeds have the iteration)
    n: np.ndarray  # [I] seeds contributing


def curve(runs: Sequence[Sequence[dict]], key: str) -> Curve:
    """Mean and spread of `key` per iteration over runs (one run = one seed's metrics rows)."""
    by_iteration: dict[int, list[float]] = {}
    for rows in runs:
        for row in rows:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                by_iteration.setdefault(int(row["iteration"]), []).append(float(value))
    iterations = sorted(by_iteration)
    stats = [mean_spread(by_iteration[i]) for i in iterations]
    return Curve(
        np.array(iterations, dtype=np.int64),
        np.array([s.mean for s in stats]),
        np.array([s.spread for s in stats]),
        np.array([s.n for s in stats], dtype=np.int64),
    )


def window_mean(rows: Sequence[dict], key: str, window: int, at_end: bool) -> float:
    """Mean of `key` over the first (or last) `window` iterations of one run."""
    ordered = sorted((r for r in rows if r.get(key) is not None and math.isfinite(r[key])), key=lambda r: r["iteration"])
    if not ordered:
        return math.nan
    picked = ordered[-window:] if at_end else ordered[:window]
    return float(np.mean([r[key] for r in picked]))


def start_end(runs: Sequence[Sequence[dict]], key: str, window: int) -> tuple[Stat, Stat, Stat]:
    """Per seed: mean of the first `window` iterations, of the last `window`, and their difference;
    each aggregated over seeds."""
    starts = [window_mean(rows, key, window, at_end=False) for rows in runs]
    ends = [window_mean(rows, key, window, at_end=True) for rows in runs]
    return mean_spread(starts), mean_spread(ends), mean_spread([e - s for s, e in zip(starts, ends)])


def raises(changes: Stat) -> bool:
    """A change counts as a rise when its mean is positive and more than two standard errors (with
    one seed: when it is positive)."""
    if changes.n == 0 or not math.isfinite(changes.mean):
        return False
    if changes.n < 2:
        return changes.mean > 0
    return changes.mean > 0 and changes.mean > 2 * changes.standard_error


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # ties share their average rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
