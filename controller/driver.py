"""The driver: `python -m learner.main [--config FILE.yaml] [--output DIR] [--resume] [key.sub=value ...]`.

One process owns the control flow (the single controller); Ray actors own the models. Each
iteration follows the paper's Algorithm 1:

    1     sample a pivot chunk p ~ U(1..L) for every group of the iteration   (TaskSampler)
    2-6   rollout workers generate chunks 1..p-1 once, fork G branches at p by perturbing only
          chunk p's initial noise, complete every branch, decode, score each whole video, and push
          the group to the replay store                                        (System.rollout)
    7-9   the learner computes group advantages, replays chunk p under the current policy and
          takes clipped contrastive GRPO steps                                 (System.update_*)
          then broadcasts the new LoRA weights to the workers                 (System.broadcast)

Semi-on-policy (and off-policy, its unclipped ablation) collects the reference groups once and
then samples that buffer at every iteration; nothing is broadcast while it trains.

Between iterations the driver applies scale requests (`python -m learner.scale`); restarts of the
learner and outages of the replay store are survived as docs/operations.md describes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from learner.config import Config, ConfigError, check_reward_settings, dump_config, load_config
from controller.run_dir import ResumeError, adopt, find_resume_point, refuse_earlier_run, write_config_records
from controller.run_log import MetricsLog, RedactingFilter, plot_reward_curves
from controller.system import LearnerRestored, System
from learner.messages import DriverState, UpdateStats
from controller.task_sampler import TaskSampler, eval_set, load_prompts
from controller.trackers import Media, Trackers
from policy.pocket.domain import FPS as POCKET_FPS
from policy.presets import get_preset
from policy.video_io import contact_sheet, grid_video
from reward_service.multi_reward import combine

log = logging.getLogger("learner")
WAN_FPS = 16.0  # Wan2.1's videos play at 16 frames a second


def train(
    config: Config,
    output: Path,
    resume: bool = False,
    on_iteration: Callable[[System, dict], None] | None = None,
    resume_from: str | None = None,
    **system_options,
) -> list[dict]:
    """Run (or resume) training; returns the metrics rows. Everything lands under `output`.

    Nothing is written and no actor starts until the configuration's reward model and heads, the
    prompt sets and (on resume) the checkpoint have been checked (controller.run_dir). `resume_from`
    names the checkpoint directory to continue from instead of the latest (implies `resume`).
    `on_iteration(system, row)` is called after each finished iteration (monitoring, tests);
    `system_options` go to `System.start` (e.g. `worker_cls=SimulatedRolloutWorker` and its
    `worker_kwargs`, as the fault tests use)."""
    output = Path(output)
    resume = resume or resume_from is not None
    alg, run = config.algorithm, config.run
    check_reward_settings(config.reward, alg)
    prompts = load_prompts(config.rollout.prompts)
    try:
        num_chunks = get_preset(config.policy.preset).num_chunks
    except KeyError as err:
        raise ConfigError(f"policy.preset: {err.args[0] if err.args else err}") from None
    eval_prompts, eval_seeds = eval_set(load_prompts(config.rollout.eval_prompts), run.eval_seeds, run.eval_prompts_limit, run.seed)
    point = find_resume_point(output, config, resume_from) if resume else None
    if point is None:
        refuse_earlier_run(output)
    # Checked: from here on the run writes.
    output.mkdir(parents=True, exist_ok=True)
    if point is not None:
        adopt(point)
    write_config_records(output, config, resume)
    metrics_log = MetricsLog(output / "metrics.jsonl")
    run_tag = point.run_tag if point is not None else output.name
    sampler = TaskSampler(config, prompts, num_chunks, run_tag)
    trackers = Trackers.open(config, output, metrics_log, resume)  # metrics.jsonl and run.trackers' others

    system = None
    try:
        trackers.log_config(config, dump_config(config))
        system = System.start(config, output, **system_options)
        start = 0
        if point is not None:
            start = system.restore().iteration
            if start != point.state.iteration:  # the learner restores what `latest` names: the checked one
                raise ResumeError(f"the learner restored iteration {start}, not the checked {point.path}")
            metrics_log.truncate_after(start)
            log.info("resumed from %s at iteration %d (policy version %d)", point.path, start, system.version)
        if alg.mode != "on_policy":
            buffer = system.fill_reference_buffer(sampler.reference_tasks(config.replay.buffer_groups))
            log.info("reference buffer: %s", buffer)
        baseline, base_media = (None, []) if resume else evaluate(system, config, eval_prompts, eval_seeds, output, tag="base")

        progress = tqdm(desc=f"{alg.objective}/{alg.mode}", initial=start, total=run.iterations)
        iteration = start
        while iteration < run.iterations:
            system.apply_scaling()  # rollout workers / reward actors asked for by `python -m learner.scale`
            system.timings.clear()
            t0 = time.perf_counter()
            try:
                if alg.mode == "on_policy":
                    tasks = sampler.tasks(iteration, alg.groups_per_iteration)  # 1: pivots, prompts, seeds
                    summaries = system.rollout(tasks)  # 2-6: fork at the pivot, complete, score, push
                    stats = system.update_on_policy(sum(s.stored for s in summaries))  # 7-9
                    system.broadcast()
                else:
                    summaries = []
                    stats = system.update_from_buffer(alg.groups_per_iteration)  # 7-9 on reference groups
                row = iteration_row(config, iteration, stats, summaries, system.timings, time.perf_counter() - t0)
                media = base_media if iteration == start else []
                last = iteration + 1 == run.iterations
                if (run.eval_every and (iteration + 1) % run.eval_every == 0) or last:
                    if alg.mode != "on_policy":
                        system.broadcast()
                    scores, samples = evaluate(system, config, eval_prompts, eval_seeds, output, tag=f"iter_{iteration + 1:06d}")
                    row.update(scores)
                    media = media + samples
                if baseline is not None and iteration == start:
                    row.update({f"base_{k}": v for k, v in baseline.items()})
                trackers.log_iteration(row, media)  # metrics.jsonl, TensorBoard, MLflow, W&B
                system.metrics.record_iteration(
                    iteration=iteration, policy_version=stats.policy_version, loss=stats.loss,
                    clip_fraction=row["clip_fraction"], reward_mean={"combined": row["reward_mean"]},
                )
                if (iteration + 1) % run.checkpoint_every == 0 or last:
                    system.checkpoint(DriverState(metrics_rows=iteration + 1, run_tag=sampler.run_tag))
                if on_iteration is not None:
                    on_iteration(system, row)
            except LearnerRestored as restored:
                # The learner restarted from a checkpoint older than this iteration: the updates after
                # it were lost, so continue from there, as --resume would (group ids repeat; each
                # group is still applied once).
                log.warning("%s; continuing from iteration %d", restored, restored.iteration)
                iteration = system.resync(restored)
                metrics_log.truncate_after(iteration)
                progress.n = iteration
                progress.refresh()
                continue
            iteration += 1
            progress.update(1)
        progress.close()
        rows = metrics_log.read()
        if rows:
            curve = plot_reward_curves(rows, output / "reward_curve.png", title=f"{alg.objective} {alg.mode} ({config.policy.preset})")
            trackers.log_media([Media("image", "reward_curve", curve)], step=rows[-1]["iteration"])
        return rows
    finally:
        trackers.close()
        if system is not None:
            system.shutdown()


def iteration_row(config: Config, iteration: int, stats: UpdateStats, summaries: list, timings: dict, seconds: float) -> dict:
    """One line of metrics.jsonl: rewards of this iteration's groups (per head and combined), the
    update's statistics, and where the time went. An objective without a ratio (NFT) has NaN in the
    ratio's columns, so every run's rows have the same columns."""
    weights = config.reward.weights
    per_head = stats.group_reward_means if not summaries else {
        h: _mean([s.reward_means[h] for s in summaries if s.num_valid]) for h in weights
    }
    row = {
        "iteration": iteration,
        "reward_mean": float(combine({h: [per_head[h]] for h in weights}, weights)[0]),
        **{f"reward_{h}": per_head[h] for h in weights},
        "loss": stats.loss,
        "clip_fraction": _or_nan(stats.clip_fraction),
        "ratio_max_deviation": _or_nan(stats.ratio_max_deviation),
        "grad_norm": stats.grad_norm,
        "policy_version": stats.policy_version,
        "groups": stats.groups,
        "groups_without_signal": stats.groups_without_signal,
        "groups_dropped": sum(not s.stored for s in summaries),
        "groups_quarantined": stats.groups_quarantined,
        "nonfinite_steps": stats.nonfinite_steps,
        "seconds": seconds,
    }
    for phase in ("rollout", "reward", "update", "broadcast"):
        row[f"{phase}_s"] = timings.get(f"{phase}_s", 0.0)
    row.update(stats.objective_stats)  # the objective's own statistics (e.g. NFT's nft_* columns)
    return row


def evaluate(system: System, config: Config, prompts: list[str], seeds: list[int], output: Path,
             tag: str) -> tuple[dict, list[Media]]:
    """Mean held-out reward (per head and combined) of the current policy; writes a contact sheet and
    a grid MP4 of the first samples, and returns the MP4 for the trackers."""
    results, frames = system.evaluate(prompts, seeds, keep_frames=min(6, len(prompts)))
    weights = config.reward.weights
    valid = [r for r in results if r.valid]
    out = {f"eval_reward_{h}": _mean([r.rewards[h] for r in valid]) for h in weights}
    out["eval_reward_mean"] = _mean([float(combine({h: [r.rewards[h]] for h in weights}, weights)[0]) for r in valid])
    out["eval_invalid"] = len(results) - len(valid)
    media = []
    if frames:
        labels = [f"{r.prompt} (seed {r.seed})" for r in results[: len(frames)]]
        contact_sheet(frames, labels, output / "samples" / f"{tag}.png")
        fps = POCKET_FPS if config.policy.preset == "pocket" else WAN_FPS
        media.append(Media("video", "heldout_samples", grid_video(frames, labels, output / "samples" / f"{tag}.mp4", fps), fps))
    return out, media


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the pocket world, configs/pocket.yaml)")
    parser.add_argument("--output", default="runs/pocket", help="output directory (metrics, checkpoints, plots)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="continue from this checkpoint of --output (e.g. iter_000040) instead of the latest")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.learning_rate=3e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    RedactingFilter.install()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        rows = train(config, Path(args.output), resume=args.resume, resume_from=args.resume_from)
    except (ConfigError, FileExistsError, FileNotFoundError, ResumeError) as err:
        print(err, file=sys.stderr)
        return 2
    if rows:
        last = rows[-1]
        print(f"done: {len(rows)} iterations, last reward {last['reward_mean']:.4f}, "
              f"held-out {last.get('eval_reward_mean', float('nan')):.4f}; outputs in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
