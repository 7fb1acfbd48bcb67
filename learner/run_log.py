"""What a run writes for people: `metrics.jsonl` (one JSON object per iteration) and reward-curve PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("iteration", "reward_mean", "loss", "clip_fraction", "policy_version")


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
            f.write(json.dumps(_nan_to_null(row), default=_json_default) + "\n")

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


def plot_reward_curves(rows: list[dict[str, Any]], out_png: Path, title: str = "") -> Path:
    """Training reward per head and, where present, held-out evaluation reward, against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    iters = [r["iteration"] for r in rows]
    heads = sorted({k[len("reward_"):] for r in rows for k in r if k.startswith("reward_") and k != "reward_mean"})
    ax_train.plot(iters, [_value(r, "reward_mean") for r in rows], label="combined", color="black", linewidth=2)
    for head in heads:
        ax_train.plot(iters, [_value(r, f"reward_{head}") for r in rows], label=head, alpha=0.8)
    ax_train.set_title("rollout reward (training groups)")
    ax_train.set_xlabel("iteration")
    ax_train.legend(fontsize=8)

    evals = [r for r in rows if "eval_reward_mean" in r]
    if evals:
        ax_eval.plot([r["iteration"] for r in evals], [_value(r, "eval_reward_mean") for r in evals], "o-", color="black", label="combined")
        for head in heads:
            key = f"eval_reward_{head}"
            if any(key in r for r in evals):
                ax_eval.plot([r["iteration"] for r in evals], [_value(r, key) for r in evals], "o-", alpha=0.8, label=head)
        ax_eval.legend(fontsize=8)
        _plot_ood(ax_eval, rows)
    ax_eval.set_title("held-out reward")
    ax_eval.set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _plot_ood(ax, rows: list[dict[str, Any]], key: str = "eval_fvd_p") -> None:
    """The out-of-domain metric on a right-hand axis of the held-out panel, the base's value at
    iteration 0: a reward that rises while it rises is reward hacking."""
    points = [(0, r[f"base_{key}"]) for r in rows[:1] if r.get(f"base_{key}") is not None]
    points += [(r["iteration"] + 1, r[key]) for r in rows if r.get(key) is not None]
    if not points:
        return
    right = ax.twinx()
    right.plot([p[0] for p in points], [p[1] for p in points], "s--", color="tab:red", alpha=0.7, label=f"{key} (right, lower is better)")
    right.set_ylabel(key, color="tab:red")
    right.tick_params(axis="y", labelcolor="tab:red")
    right.legend(fontsize=8, loc="lower right")
