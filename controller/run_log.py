"""What a run writes for people: `metrics.jsonl` (one JSON object per iteration), reward-curve PNGs,
and its log lines (with passwords inside URLs redacted)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from controller.config import redact_secrets
from controller.metrics import PHASES
from policy.video_io import save_figure

REQUIRED_KEYS = ("iteration", "reward_mean", "loss", "clip_fraction", "policy_version")


class RedactingFilter(logging.Filter):
    """Replaces passwords given inside URLs (redis://:secret@host) in every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_secrets(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_secrets(logging.Formatter().formatException(record.exc_info))
        return True

    @classmethod
    def install(cls, logger: logging.Logger | None = None) -> None:
        """Add the filter to every handler of `logger` (the root logger: all propagated records) once."""
        for handler in (logger or logging.getLogger()).handlers:
            if not any(isinstance(f, cls) for f in handler.filters):
                handler.addFilter(cls())


class MetricsLog:
    """Appends one JSON object per iteration; reading it back tolerates a torn last line (a crash mid-write)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        with self.path.open("a") as f:
            f.write(redact_secrets(json.dumps(_nan_to_null(row), default=_json_default)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_after(self, iteration: int) -> None:
        """On resume, drop rows of iterations the restored checkpoint had not reached."""
        kept = [r for r in self.read() if r.get("iteration", -1) < iteration]
        self.path.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in kept))


def _nan_to_null(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (e.g. a clip fraction where the objective has none) is not JSON: write null instead."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _value(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


# Columns of a row that start with "reward_" but are no reward head: the combined reward and the
# reward phase's wall time (`{phase}_s` for each phase of the iteration).
TIMING_COLUMNS = tuple(f"{phase}_s" for phase in PHASES)
NOT_HEADS = ("reward_mean", *TIMING_COLUMNS)

Series = dict[str, tuple[list[float], list[float]]]


def reward_heads(rows: list[dict[str, Any]]) -> list[str]:
    """The reward heads a run logged: every `reward_<head>` column except the combined reward and timings."""
    return sorted({k[len("reward_"):] for r in rows for k in r if k.startswith("reward_") and k not in NOT_HEADS})


def reward_curve_series(rows: list[dict[str, Any]]) -> tuple[Series, Series]:
    """What `plot_reward_curves` draws: (training, held-out), each {label: (x, y)}.

    Training rewards are drawn against the iteration index. Held-out rewards are drawn against the
    number of iterations done when they were measured: the base model's score (the first row's
    `base_eval_*`) at 0, an evaluation after iteration i at i + 1."""
    heads = reward_heads(rows)
    iters = [float(r["iteration"]) for r in rows]
    train: Series = {"combined": (iters, [_value(r, "reward_mean") for r in rows])}
    for head in heads:
        train[head] = (iters, [_value(r, f"reward_{head}") for r in rows])

    points: list[tuple[float, dict[str, Any], str]] = []  # (iterations done, row, column prefix)
    base = next((r for r in rows if "base_eval_reward_mean" in r), None)
    if base is not None:
        points.append((0.0, base, "base_eval_reward_"))
    points += [(float(r["iteration"]) + 1, r, "eval_reward_") for r in rows if "eval_reward_mean" in r]
    heldout: Series = {}
    for label, suffix in [("combined", "mean"), *[(h, h) for h in heads]]:
        measured = [(x, _value(r, prefix + suffix)) for x, r, prefix in points if prefix + suffix in r]
        if measured:
            heldout[label] = ([x for x, _ in measured], [y for _, y in measured])
    return train, heldout


def plot_reward_curves(rows: list[dict[str, Any]], out_png: Path, title: str = "") -> Path:
    """Training reward per head and, where present, held-out evaluation reward (from the base model on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, heldout = reward_curve_series(rows)
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (x, y) in train.items():
        style = {"color": "black", "linewidth": 2} if label == "combined" else {"alpha": 0.8}
        ax_train.plot(x, y, label=label, **style)
    ax_train.set_title("rollout reward (training groups)")
    ax_train.set_xlabel("iteration")
    ax_train.legend(fontsize=8)
    for label, (x, y) in heldout.items():
        style = {"color": "black"} if label == "combined" else {"alpha": 0.8}
        ax_eval.plot(x, y, "o-", label=label, **style)
    if heldout:
        ax_eval.legend(fontsize=8)
    _plot_ood(ax_eval, rows)
    ax_eval.set_title("held-out reward")
    ax_eval.set_xlabel("iterations done (0: base model)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png, dpi=110)


def _plot_ood(ax, rows: list[dict[str, Any]], key: str = "eval_fvd_p") -> None:
    """The out-of-domain metric on a right-hand axis of the held-out panel, the base's value at 0 and
    each evaluation at the iterations done, as the rewards beside it: a reward that rises while it
    rises is reward hacking."""
    points = [(0, r[f"base_{key}"]) for r in rows[:1] if r.get(f"base_{key}") is not None]
    points += [(r["iteration"] + 1, r[key]) for r in rows if r.get(key) is not None]
    if not points:
        return
    right = ax.twinx()
    right.plot([p[0] for p in points], [p[1] for p in points], "s--", color="tab:red", alpha=0.7, label=f"{key} (right, lower is better)")
    right.set_ylabel(key, color="tab:red")
    right.tick_params(axis="y", labelcolor="tab:red")
    right.legend(fontsize=8, loc="lower right")
