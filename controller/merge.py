"""Merge the semi-on-policy and on-policy adapters and pick the scale (paper Sec. 4.4, Tables 3-4).

    python -m learner.merge --semi RUN_OR_ADAPTER --on-policy RUN_OR_ADAPTER --output DIR \
        [--config FILE.yaml] [--scales 0,0.4,0.5,0.6,0.8,1.0] [--ood pocket_fvd] [key.sub=value ...]

For each scale s the merged weights are `W + delta_semi + s * delta_on`. Every candidate (the base
included) is evaluated on the same held-out prompts and seeds: the in-domain reward (the run's
weighted reward) and the out-of-domain metric (lower is better). The selection rule is the paper's:
the LARGEST scale whose merge improves BOTH over the base. Writes `merge.md` (the table),
`merge.json`, and the selected model's weights under `merged/` (diffusers layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from controller.config import ConfigError, load_config
from learner.checkpoint import latest_checkpoint
from controller.evaluation import EvalSummary, evaluate_policy
from policy.factory import build_configured_policy
from controller.task_sampler import eval_set, load_prompts
from policy.lora import load_adapter, merge_adapters
from policy.plugins import ood_metric_names
from policy.presets import get_preset
from reward_service.registry import build_reward

PAPER_SCALES = (0.0, 0.4, 0.5, 0.6, 0.8, 1.0)


def adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter directory, or a run directory (its newest checkpoint's adapter)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path / "checkpoints") / "adapter"
    raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor a run directory with checkpoints")


def select_scale(base: EvalSummary, merged: dict[float, EvalSummary]) -> float | None:
    """The largest scale improving the reward and (when measured) the out-of-domain metric over the base."""
    good = [
        s for s, m in merged.items()
        if m.reward > base.reward and (m.ood is None or base.ood is None or m.ood < base.ood)
    ]
    return max(good) if good else None


def merge_sweep(config, semi: Path, on_policy: Path, scales, ood: str | None, output: Path) -> dict:
    policy = build_configured_policy(config.policy)
    rewards = [build_reward(config.reward.model, **config.reward.options)]
    weights = config.reward.weights
    prompts, seeds = eval_set(
        load_prompts(config.rollout.eval_prompts), config.run.eval_seeds, config.run.eval_prompts_limit, config.run.seed
    )

    def evaluate(p) -> EvalSummary:
        return evaluate_policy(p, prompts, seeds, rewards, weights, ood)

    base = evaluate(policy)
    base_transformer = policy.transformer
    load_adapter(base_transformer, semi, "semi")
    load_adapter(base_transformer, on_policy, "on_policy")
    merged: dict[float, EvalSummary] = {}
    for scale in sorted(scales):
        policy.transformer = merge_adapters(base_transformer, {"semi": 1.0, "on_policy": scale})
        merged[scale] = evaluate(policy)
    chosen = select_scale(base, merged)

    output.mkdir(parents=True, exist_ok=True)
    result = {
        "semi": str(semi), "on_policy": str(on_policy), "ood_metric": ood, "prompts": len(prompts),
        "base": base.row(), "scales": {str(s): m.row() for s, m in merged.items()}, "selected_scale": chosen,
    }
    (output / "merge.json").write_text(json.dumps(result, indent=1))
    (output / "merge.md").write_text(merge_table(base, merged, chosen, list(weights), ood))
    if chosen is not None:
        merge_adapters(base_transformer, {"semi": 1.0, "on_policy": chosen}).save_pretrained(output / "merged")
    return result


def merge_table(base: EvalSummary, merged: dict[float, EvalSummary], chosen, heads: list[str], ood: str | None) -> str:
    cols = ["scale", *heads, "reward"] + ([f"{ood} (lower is better)"] if ood else []) + ["improves both"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def line(label: str, m: EvalSummary, verdict: str) -> str:
        cells = [label, *(f"{m.rewards[h]:.4f}" for h in heads), f"{m.reward:.4f}"]
        cells += [f"{m.ood:.4f}"] if ood else []
        return "| " + " | ".join(cells + [verdict]) + " |"

    for scale in sorted(merged, reverse=True):
        m = merged[scale]
        both = m.reward > base.reward and (not ood or m.ood < base.ood)
        label = f"{scale:g}" + (" (semi only)" if scale == 0 else "")
        lines.append(line(label, m, ("yes" if both else "no") + (" **selected**" if scale == chosen else "")))
    lines.append(line("base", base, ""))
    verdict = f"Selected scale: {chosen:g}." if chosen is not None else "No scale improves both over the base."
    return "\n".join(lines) + f"\n\n{verdict}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--semi", required=True, help="semi-on-policy adapter dir or run dir")
    parser.add_argument("--on-policy", required=True, help="on-policy adapter dir or run dir")
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", help="run config for the policy, reward and held-out prompts (default: pocket)")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in PAPER_SCALES))
    parser.add_argument("--ood", choices=[*ood_metric_names(), "none"], default=None,
                        help="out-of-domain metric (default: the preset's, e.g. pocket_fvd for the pocket preset, else none)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
    except (ConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    ood = args.ood or get_preset(config.policy.preset).ood_metric or "none"
    result = merge_sweep(config, adapter_dir(args.semi), adapter_dir(args.on_policy), scales,
                         None if ood == "none" else ood, Path(args.output))
    print((Path(args.output) / "merge.md").read_text())
    return 0 if result["selected_scale"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
