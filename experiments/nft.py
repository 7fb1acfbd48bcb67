"""Astrolabe-style NFT beside AR-CoPO on the same budget and seeds (not a table of the AR-CoPO paper).

Both train on-policy on every head with the same iterations, groups per iteration, G, learning rate
and LoRA; NFT keeps its own settings from configs/pocket_nft.yaml (beta, EMA old adapter, window of
chunks, selective regularisation). NFT's rollouts come from its EMA "old" adapter; the held-out
evaluation scores the trained adapter of each.
"""

from __future__ import annotations

from pathlib import Path

from experiments.budget import Budget
from experiments.fig2 import WINDOW, method_config
from experiments.heldout import HeldOut
from experiments.plots import plot_curves
from experiments.report import Section, markdown_table
from experiments.stats import curve, mean_spread, start_end
from experiments.tables import Scores, aggregate, scores_table
from experiments.training import RunResult, run_config, runs_note, train_run

NFT_CONFIG = "pocket_nft.yaml"


def nft_config(budget: Budget, seed: int, extra: list[str]):
    return run_config(NFT_CONFIG, [*budget.overrides(), f"run.seed={seed}", *extra])


def run(budget: Budget, seeds: list[int], out: Path, work: Path, extra: list[str], fresh: bool) -> Section:
    runs = {
        "AR-CoPO": [train_run("copo", method_config("copo", budget, s, extra), work, fresh) for s in seeds],
        "Astrolabe NFT": [train_run("nft", nft_config(budget, s, extra), work, fresh) for s in seeds],
    }
    held = HeldOut(nft_config(budget, seeds[0], extra), budget.eval_prompts)
    base = held.base()
    final = {m: [held.adapter(r.adapter_dir) for r in rs] for m, rs in runs.items()}
    lines = (budget.describe(method_config("copo", budget, seeds[0], extra)),
             budget.describe(nft_config(budget, seeds[0], extra)))
    return build_section(runs, base, final, lines, out)


def build_section(runs: dict[str, list[RunResult]], base: Scores, final: dict[str, list[Scores]],
                  budget_lines: tuple[str, str], out: Path) -> Section:
    rows = {m: [r.rows for r in rs] for m, rs in runs.items()}
    png = plot_curves(
        [("training reward, combined (VQ+MQ+TA)", {m: curve(r, "reward_mean") for m, r in rows.items()}),
         ("training reward, VQ", {m: curve(r, "reward_VQ") for m, r in rows.items()})],
        Path(out) / "nft_reward_curves.png",
        title="Astrolabe NFT vs AR-CoPO on the pocket world (mean ± std over seeds)",
    )
    cost_rows, changes = [], {}
    for method, rs in runs.items():
        _, _, tr_change = start_end(rows[method], "reward_mean", WINDOW)
        changes[method] = mean_spread([s.overall - base.overall for s in final[method]])
        per_iteration = mean_spread([sum(r["seconds"] for r in run.rows) / len(run.rows) for run in rs])
        update = mean_spread([sum(r["update_s"] for r in run.rows) / len(run.rows) for run in rs])
        cost_rows.append([method, tr_change.fmt(), changes[method].fmt(), per_iteration.fmt(1), update.fmt(2),
                          mean_spread([r.wall_s for r in rs]).fmt(0)])
    cost = markdown_table(
        ["method", f"training reward change (first vs last {WINDOW} it.)", "held-out Overall change", "s / iteration",
         "learner update s / iteration", "run wall time s"],
        cost_rows,
    )
    better = max(changes, key=lambda m: changes[m].mean)
    body = "\n".join([
        "Command: `python -m experiments.run nft`.",
        f"AR-CoPO: {budget_lines[0]}",
        f"NFT: {budget_lines[1]} NFT's own settings: configs/pocket_nft.yaml.",
        f"Runs: {runs_note([r for rs in runs.values() for r in rs])}.",
        "",
        f"![reward curves]({png.name})",
        "",
        cost,
        "Held-out scores of the final adapters:",
        "",
        scores_table("model", {"base": [base], **final}),
        f"Larger held-out Overall gain at this budget: {better} ({changes[better].fmt()}).",
    ])
    data = {
        "base": base.row(),
        "final": {m: [s.row() for s in ss] for m, ss in final.items()},
        "final_mean": {m: {k: vars(v) for k, v in aggregate(ss).items()} for m, ss in final.items()},
        "held_out_change": {m: vars(c) for m, c in changes.items()},
        "runs": {m: [r.directory.name for r in rs] for m, rs in runs.items()},
        "png": png.name,
    }
    return Section("nft", "Astrolabe NFT beside AR-CoPO (same budget)", body, [], data)
