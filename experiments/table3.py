"""Table 3: merge-scale sweep, semi-on-policy adapter + s x on-policy adapter, with the dual selection rule.

Per seed, a semi-on-policy and an on-policy AR-CoPO adapter are trained on every head (the on-policy
run is Figure 2's AR-CoPO run); each merge `W + delta_semi + s delta_on` is evaluated on the held-out
prompts. The selection rule is `learner.merge.select_scale` (the paper's): the largest scale whose
merge improves both the in-domain reward (Overall) and the out-of-domain metric (FVD-p) over the base.
"""

from __future__ import annotations

from pathlib import Path

from experiments.budget import Budget
from experiments.fig2 import method_config
from experiments.heldout import HeldOut
from experiments.plots import plot_against
from experiments.report import Claim, Section
from experiments.stats import spearman
from experiments.tables import Scores, aggregate, scores_table
from experiments.training import RunResult, run_config, runs_note, train_run
from controller.merge import PAPER_SCALES, select_scale

SCALES = PAPER_SCALES  # 0, 0.4, 0.5, 0.6, 0.8, 1.0


def semi_config(budget: Budget, seed: int, extra: list[str]):
    return run_config(None, [*budget.overrides(), "algorithm.objective=copo", "algorithm.mode=semi_on_policy",
                             f"run.seed={seed}", *extra])


def run(budget: Budget, seeds: list[int], out: Path, work: Path, extra: list[str], fresh: bool) -> Section:
    semi = [train_run("copo-semi", semi_config(budget, s, extra), work, fresh) for s in seeds]
    on = [train_run("copo", method_config("copo", budget, s, extra), work, fresh) for s in seeds]
    held = HeldOut(semi_config(budget, seeds[0], extra), budget.eval_prompts)
    base = held.base()
    sweeps = [{s: held.merged({sr.adapter_dir: 1.0, orun.adapter_dir: s}) for s in SCALES} for sr, orun in zip(semi, on)]
    return build_section(semi + on, base, sweeps, budget.describe(semi_config(budget, seeds[0], extra)), out)


def build_section(runs: list[RunResult], base: Scores, sweeps: list[dict[float, Scores]], budget_line: str, out: Path) -> Section:
    scales = sorted(sweeps[0], reverse=True)
    per_seed_choice = [select_scale(base.summary(), {s: m.summary() for s, m in sweep.items()}) for sweep in sweeps]
    by_scale = {s: [sweep[s] for sweep in sweeps] for s in scales}
    means = {s: aggregate(ms) for s, ms in by_scale.items()}
    mean_choice = select_scale(base.summary(), {s: Scores({}, means[s]["Overall"].mean, means[s]["FVD"].mean).summary() for s in scales})

    def verdict(s: float) -> list[str]:
        both = sum(m.overall > base.overall and m.fvd < base.fvd for m in by_scale[s])
        mark = " **selected**" if s == mean_choice else ""
        return [f"{both}/{len(by_scale[s])}{mark}"]

    labels = {s: f"{s:g}" + (" (semi only)" if s == 0 else "") for s in scales}
    table = scores_table(
        "scale s", {labels[s]: by_scale[s] for s in scales} | {"base (pocket generator)": [base]},
        extra={labels[s]: verdict(s) for s in scales}, extra_header=["seeds improving both"],
    )
    ordered = sorted(scales)
    png = plot_against(
        ordered,
        [("held-out Overall (higher is better)", [means[s]["Overall"] for s in ordered], base.overall),
         ("FVD-p (lower is better)", [means[s]["FVD"] for s in ordered], base.fvd)],
        Path(out) / "table3_merge_sweep.png", xlabel="on-policy scale s (semi + s x on-policy)",
        title="Merging the on-policy adapter into the semi-on-policy one (mean ± std over seeds)",
    )
    choices = ", ".join("none" if c is None else f"{c:g}" for c in per_seed_choice)
    chosen = "no scale improves both over the base" if mean_choice is None else f"selected scale {mean_choice:g}"
    body = "\n".join([
        "Command: `python -m experiments.run table3`. " + budget_line,
        "Both adapters train on every head (VQ + MQ + TA); the on-policy one is Figure 2's AR-CoPO run.",
        f"Runs: {runs_note(runs)}.",
        "",
        table,
        f"Selection rule on the seed means: {chosen}; per seed: {choices}.",
        "",
        f"![merge sweep]({png.name})",
    ])
    overall_trend = spearman(ordered, [means[s]["Overall"].mean for s in ordered])
    fvd_trend = spearman(ordered, [means[s]["FVD"].mean for s in ordered])
    top, semi_only = means[max(scales)], means[min(scales)]
    trades = top["Overall"].mean > semi_only["Overall"].mean and top["FVD"].mean > semi_only["FVD"].mean
    claim = Claim(
        "Merging trades one benchmark for the other (more on-policy weight: higher reward, worse out-of-domain metric)",
        trades,
        f"s = {max(scales):g} vs s = {min(scales):g}: Overall {top['Overall'].fmt()} vs {semi_only['Overall'].fmt()}, "
        f"FVD-p {top['FVD'].fmt(2)} vs {semi_only['FVD'].fmt(2)} (criterion: both higher at the larger scale). "
        f"Spearman correlation with s over the sweep: Overall {overall_trend:+.2f}, FVD-p {fvd_trend:+.2f}. {chosen.capitalize()}.",
    )
    data = {
        "base": base.row(),
        "sweep": {f"{s:g}": [m.row() for m in by_scale[s]] for s in scales},
        "sweep_mean": {f"{s:g}": {k: vars(v) for k, v in means[s].items()} for s in scales},
        "selected_scale": mean_choice,
        "selected_per_seed": per_seed_choice,
        "spearman": {"Overall": overall_trend, "FVD": fvd_trend},
        "runs": [r.directory.name for r in runs],
        "png": png.name,
    }
    return Section("table3", "Table 3: merge-scale sweep with the dual selection rule", body, [claim], data)

