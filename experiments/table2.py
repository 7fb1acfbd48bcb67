"""Table 2: on-policy vs semi-on-policy vs off-policy AR-CoPO, optimising TA only.

All three train the same adapter settings on `reward.weights={TA: 1.0}`; every head and the
out-of-domain metric are measured on the held-out prompts afterwards. Semi-on-policy and off-policy
(the same without the ratio clip) train on one reference buffer rolled out once from the base policy;
the off-policy run imports the buffer the semi-on-policy run of its seed exported, which is the
buffer it would collect itself (same seed, same tasks, same base policy).
"""

from __future__ import annotations

from pathlib import Path

from experiments.budget import Budget
from experiments.heldout import HeldOut
from experiments.plots import plot_grouped_bars
from experiments.report import Claim, Section
from experiments.stats import mean_spread
from experiments.tables import HEADS, Scores, aggregate, scores_table
from experiments.training import RunResult, run_config, runs_note, train_run

TA_ONLY = "reward.weights={TA: 1.0}"
MODES = {"on-policy": "on_policy", "semi-on-policy": "semi_on_policy", "off-policy": "off_policy"}
KEEP_FVD = 0.10  # "keeps" the out-of-domain metric: FVD-p at most 10 % above the base's
COLLAPSE_OVERALL = 0.10  # "collapses": Overall more than 10 % below the base's, or FVD-p at least doubled


def mode_config(mode: str, budget: Budget, seed: int, extra: list[str], buffer: Path | None = None):
    overrides = [*budget.overrides(), "algorithm.objective=copo", f"algorithm.mode={mode}", TA_ONLY, f"run.seed={seed}", *extra]
    if buffer is not None:
        overrides.append(f"replay.import_buffer={buffer}")
    return run_config(None, overrides)


def run(budget: Budget, seeds: list[int], out: Path, work: Path, extra: list[str], fresh: bool) -> Section:
    runs: dict[str, list[RunResult]] = {label: [] for label in MODES}
    for seed in seeds:
        runs["on-policy"].append(train_run("copo-on-TA", mode_config("on_policy", budget, seed, extra), work, fresh))
        semi = train_run("copo-semi-TA", mode_config("semi_on_policy", budget, seed, extra), work, fresh)
        runs["semi-on-policy"].append(semi)
        off = mode_config("off_policy", budget, seed, extra, buffer=semi.directory / "reference_buffer")
        runs["off-policy"].append(train_run("copo-off-TA", off, work, fresh))
    config = mode_config("on_policy", budget, seeds[0], extra)
    held = HeldOut(config, budget.eval_prompts)
    base = held.base()
    final = {label: [held.adapter(r.adapter_dir) for r in rs] for label, rs in runs.items()}
    return build_section(runs, base, final, budget.describe(config), out)


def build_section(runs: dict[str, list[RunResult]], base: Scores, final: dict[str, list[Scores]], budget_line: str,
                  out: Path) -> Section:
    models = {"base (pocket generator)": [base], **final}
    table = scores_table("training strategy (TA only)", models)
    stats = {label: aggregate(scores) for label, scores in models.items()}
    png = plot_grouped_bars(
        [*HEADS, "Overall"],
        {label: [s[c] for c in (*HEADS, "Overall")] for label, s in stats.items()},
        Path(out) / "table2_rewards.png",
        ylabel="held-out score (higher is better)",
        title="Optimising TA only: every head on held-out prompts (mean ± std over seeds)",
    )
    fvd_png = plot_grouped_bars(
        ["FVD-p"], {label: [s["FVD"]] for label, s in stats.items()}, Path(out) / "table2_fvd.png",
        ylabel="FVD-p (lower is better)", title="Out-of-domain metric after TA-only training",
    )
    body = "\n".join([
        "Command: `python -m experiments.run table2`. " + budget_line,
        "All three optimise `reward.weights={TA: 1.0}`; off-policy is semi-on-policy without the ratio clip.",
        f"Runs: {runs_note([r for rs in runs.values() for r in rs])}.",
        "",
        table,
        f"![rewards]({png.name}) ![fvd]({fvd_png.name})",
    ])
    claims = table2_claims(base, final)
    data = {
        "base": base.row(),
        "final": {m: [s.row() for s in ss] for m, ss in final.items()},
        "final_mean": {m: {k: vars(v) for k, v in aggregate(ss).items()} for m, ss in final.items()},
        "runs": {m: [r.directory.name for r in rs] for m, rs in runs.items()},
        "png": [png.name, fvd_png.name],
    }
    return Section("table2", "Table 2: on-policy vs semi-on-policy vs off-policy, optimising TA only", body, claims, data)


def _relative(value: float, base: float) -> float:
    return (value - base) / abs(base)


def table2_claims(base: Scores, final: dict[str, list[Scores]]) -> list[Claim]:
    fvd = {m: mean_spread([s.fvd for s in ss]) for m, ss in final.items()}
    overall = {m: mean_spread([s.overall for s in ss]) for m, ss in final.items()}
    ta = {m: mean_spread([s.heads["TA"] for s in ss]) for m, ss in final.items()}
    rel_fvd = {m: _relative(f.mean, base.fvd) for m, f in fvd.items()}
    rel_overall = {m: _relative(o.mean, base.overall) for m, o in overall.items()}

    semi_keeps = rel_fvd["semi-on-policy"] <= KEEP_FVD
    on_degrades = rel_fvd["on-policy"] > KEEP_FVD
    keep = Claim(
        "Semi-on-policy keeps the out-of-domain metric while on-policy TA-only degrades it",
        semi_keeps and on_degrades,
        f"FVD-p base {base.fvd:.2f}; semi-on-policy {fvd['semi-on-policy'].fmt(2)} ({rel_fvd['semi-on-policy']:+.0%}, "
        f"{'kept' if semi_keeps else 'not kept'}); on-policy {fvd['on-policy'].fmt(2)} ({rel_fvd['on-policy']:+.0%}, "
        f"{'degraded' if on_degrades else 'not degraded'}). Criterion: kept = at most {KEEP_FVD:.0%} above the base. "
        f"TA: base {base.heads['TA']:.3f}, on-policy {ta['on-policy'].fmt()}, semi-on-policy {ta['semi-on-policy'].fmt()}.",
    )
    off_fvd_ratio = fvd["off-policy"].mean / base.fvd
    collapses = rel_overall["off-policy"] < -COLLAPSE_OVERALL or off_fvd_ratio >= 2.0
    collapse = Claim(
        "Off-policy (no ratio clip) collapses",
        collapses,
        f"Off-policy Overall {overall['off-policy'].fmt()} vs base {base.overall:.3f} ({rel_overall['off-policy']:+.0%}), "
        f"FVD-p {fvd['off-policy'].fmt(2)} ({off_fvd_ratio:.2f}x the base); semi-on-policy Overall "
        f"{overall['semi-on-policy'].fmt()}. Criterion: Overall more than {COLLAPSE_OVERALL:.0%} below the base, "
        f"or FVD-p at least 2x the base.",
    )
    return [keep, collapse]
