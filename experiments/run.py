"""Run one of the paper's experiments on the pocket world and write its section of the results.

    python -m experiments.run fig2|fig6|table2|table3|nft|all [--seeds N] [--budget small|full] [--out results/]
        [--work runs/experiments] [--weights DIR] [--fresh]

fig2    reward curves, AR-CoPO vs SDE-GRPO (same budget, same seeds)
fig6    entropy sources: initial-noise replacement vs one re-noise draw, per chunk position
table2  on-policy vs semi-on-policy vs off-policy, optimising TA only: every head and FVD-p
table3  merge-scale sweep (semi + s x on-policy) with the dual selection rule
nft     Astrolabe NFT beside AR-CoPO on the same budget
all     every one of the above, in that order, sharing runs where their configurations agree

Writes `<out>/experiments.md` (its section replaced, the others kept), `<out>/experiments.json` and
PNGs in `<out>/`; training runs go under `--work` and a finished run with the same configuration is
reused unless `--fresh`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse
import logging
import sys
import time
from pathlib import Path

from experiments.budget import BUDGETS, Budget, get_budget
from experiments.report import Section, write_section

EXPERIMENTS = ("fig2", "fig6", "table2", "table3", "nft")
log = logging.getLogger("experiments")


def run_experiment(name: str, budget: Budget, seeds: list[int], out: Path, work: Path, weights: Path | None,
                   fresh: bool) -> Section:
    """Run `name` and write its section; returns the section (its body ends with the measured wall time)."""
    extra = [f"policy.transformer_checkpoint={weights}"] if weights else []
    t0 = time.perf_counter()
    if name == "fig6":
        section = _fig6(budget, out, weights)
        seeds = list(range(budget.entropy_seeds))
    else:
        from experiments import fig2, nft, table2, table3

        module = {"fig2": fig2, "table2": table2, "table3": table3, "nft": nft}[name]
        section = module.run(budget, seeds, out, work, extra, fresh)
    wall = time.perf_counter() - t0
    section.body += f"\n\nWall time of this command: {wall:.0f} s ({wall / 60:.1f} min), budget `{budget.name}`, seeds {seeds}.\n"
    section.data.update({"budget": budget.as_dict(), "seeds": seeds, "wall_s": wall})
    path = write_section(out, section)
    log.info("%s done in %.0f s; wrote %s", name, wall, path)
    return section


def _fig6(budget: Budget, out: Path, weights: Path | None) -> Section:
    from experiments import fig6
    from pocket import domain
    from pocket.preset import WEIGHTS_DIR, load_pocket_policy

    directory = weights or WEIGHTS_DIR
    policy = load_pocket_policy(directory)
    note = "Shipped pocket weights." if weights is None else f"Pocket weights from `{Path(weights).name}/`."
    return fig6.run(policy, domain.heldout_prompts()[::5], list(range(budget.entropy_seeds)), out, note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--budget", default="full", choices=sorted(BUDGETS), help="small: a smoke run of minutes; full (default)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default: the budget's)")
    parser.add_argument("--out", default="results", help="results directory (default: results/)")
    parser.add_argument("--work", default="runs/experiments", help="training runs directory")
    parser.add_argument("--weights", default=None, help="pocket weights directory (default: the shipped weights)")
    parser.add_argument("--fresh", action="store_true", help="retrain every run (reuse only runs made by this command)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        budget = get_budget(args.budget)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    seeds = list(range(args.seeds if args.seeds is not None else budget.seeds))
    if not seeds:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    weights = Path(args.weights).resolve() if args.weights else None
    if weights is not None and not (weights / "diffusion_pytorch_model.safetensors").is_file():
        print(f"--weights {weights}: no diffusion_pytorch_model.safetensors there", file=sys.stderr)
        return 2
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    try:
        for name in names:
            section = run_experiment(name, budget, seeds, Path(args.out), Path(args.work), weights, args.fresh)
            print(section.markdown())
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
