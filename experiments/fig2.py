"""Figure 2 (and 7): reward curves of AR-CoPO and SDE-GRPO on the same budget and the same seeds.

Both train on-policy on every head (VQ + MQ + TA) with identical settings: iterations, groups per
iteration, G, learning rate, clip, LoRA, and the same tasks per iteration (prompt, noise seed, pivot
depend only on the run seed). AR-CoPO forks the pivot chunk's initial noise and uses the contrastive
x0-distance surrogate; SDE-GRPO shares every initial noise, gives each branch its own re-noise draws
in the pivot chunk and uses the Gaussian log-probability ratio of those steps.
"""

from __future__ import annotations

from pathlib import Path

from experiments.budget import Budget
from experiments.heldout import HeldOut
from experiments.plots import plot_curves
from experiments.report import Claim, Section, markdown_table
from experiments.stats import Stat, curve, mean_spread, raises, start_end
from experiments.tables import Scores, aggregate, scores_table
from experiments.training import RunResult, run_config, runs_note, train_run

METHODS = {"AR-CoPO": "copo", "SDE-GRPO": "sde_grpo"}
WINDOW = 3  # iterations averaged at each end of a training curve


def method_config(objective: str, budget: Budget, seed: int, extra: list[str]):
    return run_config(None, [*budget.overrides(), f"algorithm.objective={objective}", "algorithm.mode=on_policy",
                             f"run.seed={seed}", *extra])


def run(budget: Budget, seeds: list[int], out: Path, work: Path, extra: list[str], fresh: bool) -> Section:
    runs = {m: [train_run(obj, method_config(obj, budget, s, extra), work, fresh) for s in seeds] for m, obj in METHODS.items()}
    config = method_config("copo", budget, seeds[0], extra)
    held = HeldOut(config, budget.eval_prompts)
    base = held.base()
    final = {m: [held.adapter(r.adapter_dir) for r in rs] for m, rs in runs.items()}
    return build_section(runs, base, final, budget.describe(config), out)


def build_section(runs: dict[str, list[RunResult]], base: Scores, final: dict[str, list[Scores]], budget_line: str,
                  out: Path) -> Section:
    """Everything after training: curves, the start-vs-end table, the held-out table, the claim."""
    rows = {m: [r.rows for r in rs] for m, rs in runs.items()}
    png = plot_curves(
        [("training reward, combined (VQ+MQ+TA)", {m: curve(r, "reward_mean") for m, r in rows.items()}),
         ("training reward, VQ (as the paper's Fig. 7)", {m: curve(r, "reward_VQ") for m, r in rows.items()})],
        Path(out) / "fig2_reward_curves.png",
        title="AR-CoPO vs SDE-GRPO on the pocket world (mean ± std over seeds)",
    )
    base_overall = base.overall
    change_rows, changes, training_changes = [], {}, {}
    for method, method_rows in rows.items():
        tr_start, tr_end, tr_change = start_end(method_rows, "reward_mean", WINDOW)
        held_end = mean_spread([s.overall for s in final[method]])
        held_change = mean_spread([s.overall - base_overall for s in final[method]])
        silent = mean_spread([sum(r["groups_without_signal"] for r in rr) / max(1, sum(r["groups"] for r in rr))
                              for rr in method_rows])
        changes[method], training_changes[method] = held_change, tr_change
        change_rows.append([method, tr_start.fmt(), tr_end.fmt(), tr_change.fmt(), f"{base_overall:.3f}", held_end.fmt(),
                            held_change.fmt(), silent.fmt(2)])
    table = markdown_table(
        ["method", f"training reward, first {WINDOW} it.", f"last {WINDOW} it.", "change",
         "held-out Overall, start (base)", "end", "change", "groups without signal (fraction)"],
        change_rows,
    )
    held_table = scores_table("model", {"base": [base], **final})
    body = "\n".join([
        "Command: `python -m experiments.run fig2`. " + budget_line,
        f"Runs: {runs_note([r for rs in runs.values() for r in rs])}.",
        "",
        f"![reward curves]({png.name})",
        "",
        "Training reward: the mean reward of the iteration's rollout groups (the curves); first/last columns",
        f"average {WINDOW} iterations per seed. Held-out: the final adapter of every seed on the held-out prompts.",
        "A group without signal has all its branch rewards equal (no advantage to learn from).",
        "",
        table,
        "Held-out scores of the final adapters:",
        "",
        held_table,
    ])
    claim = fig2_claim(changes["AR-CoPO"], changes["SDE-GRPO"], training_changes)
    data = {
        "base": base.row(),
        "final": {m: [s.row() for s in ss] for m, ss in final.items()},
        "held_out_change": {m: vars(c) for m, c in changes.items()},
        "final_mean": {m: {k: vars(v) for k, v in aggregate(ss).items()} for m, ss in final.items()},
        "runs": {m: [r.directory.name for r in rs] for m, rs in runs.items()},
        "png": png.name,
    }
    return Section("fig2", "Figure 2 / 7: AR-CoPO vs SDE-GRPO reward curves", body, [claim], data)


def fig2_claim(copo: Stat, sde: Stat, training: dict[str, Stat] | None = None) -> Claim:
    copo_up, sde_up = raises(copo), raises(sde)
    evidence = (
        f"Held-out Overall change after training: AR-CoPO {copo.fmt()} ({'a rise' if copo_up else 'no rise'}), "
        f"SDE-GRPO {sde.fmt()} ({'a rise' if sde_up else 'no rise'}); a rise is a positive mean change larger "
        f"than two standard errors over {copo.n} seed(s)."
    )
    if training:
        evidence += " Training reward, last vs first iterations: " + ", ".join(
            f"{m} {c.fmt()} ({'a rise' if raises(c) else 'no rise'})" for m, c in training.items()) + "."
    holds = (copo_up and not sde_up) if min(copo.n, sde.n) >= 2 else None  # one seed has no spread to judge by
    return Claim("AR-CoPO raises the reward where SDE-GRPO does not", holds, evidence)
