"""The PNG figures: curves with a spread band, grouped bars with error bars, metrics against a scale."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.stats import Curve, Stat


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_curves(panels: Sequence[tuple[str, Mapping[str, Curve]]], path: Path, title: str = "") -> Path:
    """One panel per (ylabel, {label: curve}): the mean per iteration and a mean ± spread band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for label, c in curves.items():
            (line,) = ax.plot(c.iterations, c.mean, label=f"{label} (n={int(c.n.max()) if len(c.n) else 0})", linewidth=2)
            spread = np.nan_to_num(c.spread, nan=0.0)
            ax.fill_between(c.iterations, c.mean - spread, c.mean + spread, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_grouped_bars(
    groups: Sequence[str], series: Mapping[str, Sequence[Stat]], path: Path, ylabel: str, title: str = "", log: bool = False
) -> Path:
    """Bars of each series per group with ± spread error bars (e.g. chunks x noise sources)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (label, stats) in enumerate(series.items()):
        means = [s.mean for s in stats]
        errors = [0.0 if not math.isfinite(s.spread) else s.spread for s in stats]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_against(
    xs: Sequence[float], panels: Sequence[tuple[str, Sequence[Stat], float | None]], path: Path, xlabel: str, title: str = ""
) -> Path:
    """One panel per (ylabel, stats at each x, baseline or None): mean ± spread against x."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, stats, baseline) in zip(axes[0], panels):
        errors = [0.0 if not math.isfinite(s.spread) else s.spread for s in stats]
        ax.errorbar(xs, [s.mean for s in stats], yerr=errors, marker="o", capsize=3, label="merged")
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", label="base")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
