"""The driver: `python -m learner.main [--config FILE.yaml] [--output DIR] [--resume] [key.sub=value ...]`.

One process owns the control flow (the single controller); Ray actors own the models. Each
iteration follows the paper's Algorithm 1:

    1     sample a pivot chunk p ~ U(1..L) for every group of the iteration   (TaskSampler)
    2-6   rollout workers generate chunks 1..p-1 once, fork G branches at p by perturbing only
          chunk p's initial noise, complete every branch, decode, score each whole video, and push
          the group to the replay store                                        (System.rollout)
          (with `algorithm.max_policy_lag` >= 1 the next iteration's groups are made meanwhile,
          by the adapter of the version before: pipelining, a property of System's steps)
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
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from learner.settings import AlgorithmSettings
from controller.config import Config, ConfigError, check_reward_settings, dump_config, load_config
from controller.run_dir import ResumeError, ResumePoint, adopt, find_resume_point, refuse_earlier_run, write_config_records
from controller.evaluation import ood_metric, ood_metric_for_preset, write_base_vs_final
from controller.run_log import MetricsLog, RedactingFilter, plot_reward_curves
from controller.system import LearnerRestored, System
from learner.messages import DriverState, UpdateStats
from controller.task_sampler import TaskSampler, eval_set, load_prompts
from controller.trackers import Media, Trackers
from policy.plugins import ood_column
from policy.presets import get_preset
from policy.video_io import contact_sheet, grid_video
from reward_service.multi_reward import combine

log = logging.getLogger("learner")
SHEET_ROWS = 6  # held-out samples on each contact sheet
BASE_VS_FINAL = "samples_base_vs_final.png"  # the run's first picture: base and trained samples side by side


@dataclass
class _Run:
    """What the loop needs beside the system: the checked inputs and the run's records."""

    config: Config
    output: Path
    sampler: TaskSampler
    eval_prompts: list[str]
    eval_seeds: list[int]
    metrics_log: MetricsLog
    trackers: Trackers
    point: ResumePoint | None
    on_iteration: Callable[[System, dict], None] | None = None
    baseline: dict | None = None  # the held-out scores before training (a fresh run only)
    base_media: list = field(default_factory=list)
    samples: dict = field(default_factory=dict)  # contact-sheet frames and results per evaluation tag


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
    run = _open_run(config, Path(output), resume or resume_from is not None, resume_from, on_iteration)
    system = None
    try:
        run.trackers.log_config(config, dump_config(config))
        system = System.start(config, run.output, **system_options)
        start = _restore(system, run)
        if config.algorithm.mode != "on_policy":
            buffer = system.fill_reference_buffer(run.sampler.reference_tasks(config.replay.buffer_groups))
            log.info("reference buffer: %s", buffer)
        if run.point is None:
            run.baseline, run.base_media = evaluate(system, config, run.eval_prompts, run.eval_seeds, run.output, tag="base",
                                                    samples=run.samples)
        _loop(system, run, start)
        return _close_run(run)
    finally:
        run.trackers.close()
        if system is not None:
            system.shutdown()


def _open_run(config: Config, output: Path, resume: bool, resume_from: str | None,
              on_iteration: Callable[[System, dict], None] | None) -> _Run:
    """Check the configuration, the prompt sets and (on resume) the checkpoint, then open the run's
    records; nothing is written before every check passed."""
    check_reward_settings(config.reward, config.algorithm)
    prompts = load_prompts(config.rollout.prompts)
    try:
        num_chunks = get_preset(config.policy.preset).num_chunks
    except KeyError as err:
        raise ConfigError(f"policy.preset: {err.args[0] if err.args else err}") from None
    run = config.run
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
    sampler = TaskSampler(config, prompts, num_chunks, point.run_tag if point is not None else output.name)
    trackers = Trackers.open(config, output, metrics_log, resume)  # metrics.jsonl and run.trackers' others
    return _Run(config, output, sampler, eval_prompts, eval_seeds, metrics_log, trackers, point, on_iteration)


def _restore(system: System, run: _Run) -> int:
    """The iteration to start from: 0, or the checked checkpoint's (which the learner restores)."""
    if run.point is None:
        return 0
    start = system.restore().iteration
    if start != run.point.state.iteration:  # the learner restores what `latest` names: the checked one
        raise ResumeError(f"the learner restored iteration {start}, not the checked {run.point.path}")
    run.metrics_log.truncate_after(start)
    log.info("resumed from %s at iteration %d (policy version %d)", run.point.path, start, system.version)
    return start


def _loop(system: System, run: _Run, start: int) -> None:
    alg, total = run.config.algorithm, run.config.run.iterations
    progress = tqdm(desc=f"{alg.objective}/{alg.mode}", initial=start, total=total)
    iteration = start
    while iteration < total:
        system.apply_scaling()  # rollout workers / reward actors asked for by `python -m learner.scale`
        system.timings.clear()
        t0 = time.perf_counter()
        try:
            stats, summaries = train_iteration(system, run.sampler, alg, iteration)
            row = iteration_row(run.config, iteration, stats, summaries, system.timings, time.perf_counter() - t0)
            _record_iteration(system, run, iteration, start, stats, row)
        except LearnerRestored as restored:
            # The learner restarted from a checkpoint older than this iteration: the updates after
            # it were lost, so continue from there, as --resume would (group ids repeat; each
            # group is still applied once).
            log.warning("%s; continuing from iteration %d", restored, restored.iteration)
            iteration = system.resync(restored)
            run.metrics_log.truncate_after(iteration)
            progress.n = iteration
            progress.refresh()
            continue
        iteration += 1
        progress.update(1)
    progress.close()


def train_iteration(system: System, sampler: TaskSampler, alg: AlgorithmSettings, iteration: int) -> tuple[UpdateStats, list]:
    """One iteration of Algorithm 1; returns the update's statistics and the groups' summaries."""
    if alg.mode == "on_policy":
        tasks = sampler.tasks(iteration, alg.groups_per_iteration)  # 1: pivots, prompts, seeds
        # 2-6: fork at the pivot, complete, score, push; with pipelining (algorithm.max_policy_lag >= 1)
        # the next iteration's groups are made behind them, through the update below
        summaries = system.rollout(tasks, next_tasks=sampler.next_tasks(iteration, alg.groups_per_iteration))
        stats = system.update_on_policy(sum(s.stored for s in summaries))  # 7-9
        system.broadcast()
        return stats, summaries
    return system.update_from_buffer(alg.groups_per_iteration), []  # 7-9 on reference groups


def _record_iteration(system: System, run: _Run, iteration: int, start: int, stats: UpdateStats, row: dict) -> None:
    """Evaluate when due, log the row (metrics.jsonl, TensorBoard, MLflow, W&B), checkpoint when due."""
    config = run.config
    media = run.base_media if iteration == start else []
    last = iteration + 1 == config.run.iterations
    if (config.run.eval_every and (iteration + 1) % config.run.eval_every == 0) or last:
        if config.algorithm.mode != "on_policy":
            system.broadcast()
        scores, eval_media = evaluate(system, config, run.eval_prompts, run.eval_seeds, run.output,
                                      tag=f"iter_{iteration + 1:06d}", samples=run.samples)
        row.update(scores)
        media = media + eval_media
    if run.baseline is not None and iteration == start:
        row.update({f"base_{k}": v for k, v in run.baseline.items()})
    run.trackers.log_iteration(row, media)
    system.metrics.record_iteration(
        iteration=iteration, policy_version=stats.policy_version, loss=stats.loss,
        clip_fraction=row["clip_fraction"], reward_mean={"combined": row["reward_mean"]},
    )
    if (iteration + 1) % config.run.checkpoint_every == 0 or last:
        system.checkpoint(DriverState(metrics_rows=iteration + 1, run_tag=run.sampler.run_tag))
    if run.on_iteration is not None:
        run.on_iteration(system, row)


def _close_run(run: _Run) -> list[dict]:
    """The metrics rows, after plotting the reward curve."""
    rows = run.metrics_log.read()
    if rows:
        alg = run.config.algorithm
        curve = plot_reward_curves(rows, run.output / "reward_curve.png", title=f"{alg.objective} {alg.mode} ({run.config.policy.preset})")
        run.trackers.log_media([Media("image", "reward_curve", curve)], step=rows[-1]["iteration"])
    write_base_vs_final(run.samples, run.output / BASE_VS_FINAL, list(run.config.reward.weights))
    return rows


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
        "groups_stale": sum(s.drop_reason.startswith("stale") for s in summaries),  # of those dropped
        "groups_quarantined": stats.groups_quarantined,
        "nonfinite_steps": stats.nonfinite_steps,
        "seconds": seconds,
    }
    for phase in ("rollout", "reward", "update", "broadcast"):
        row[f"{phase}_s"] = timings.get(f"{phase}_s", 0.0)
    row.update(stats.objective_stats)  # the objective's own statistics (e.g. NFT's nft_* columns)
    return row


def evaluate(system: System, config: Config, prompts: list[str], seeds: list[int], output: Path,
             tag: str, samples: dict | None = None) -> tuple[dict, list[Media]]:
    """Mean held-out reward (per head and combined) of the current policy and, where the preset has
    one, the out-of-domain metric (`eval_fvd_p` for the pocket world: reward hacking shows as it
    rises); writes a contact sheet and a grid MP4 of the first samples, and returns the MP4 for the
    trackers. `samples[tag]` gets the sheet's frames and results (for the base-vs-final sheet)."""
    ood = ood_metric_for_preset(config.policy.preset)
    shown = min(SHEET_ROWS, len(prompts))
    results, frames = system.evaluate(prompts, seeds, keep_frames=len(prompts) if ood else shown)
    weights = config.reward.weights
    valid = [r for r in results if r.valid]
    out = {f"eval_reward_{h}": _mean([r.rewards[h] for r in valid]) for h in weights}
    out["eval_reward_mean"] = _mean([float(combine({h: [r.rewards[h]] for h in weights}, weights)[0]) for r in valid])
    out["eval_invalid"] = len(results) - len(valid)
    if ood is not None and len(frames) == len(prompts):  # workers that make no videos (simulated) give none
        try:
            out[f"eval_{ood_column(ood)}"] = ood_metric(ood, frames, prompts)
        except ValueError as err:  # e.g. a feature distance over too few held-out videos
            log.warning("out-of-domain metric %s left out of %s: %s", ood, tag, err)
    media = []
    if frames:
        labels = [f"{r.prompt} (seed {r.seed})" for r in results[:shown]]
        contact_sheet(frames[:shown], labels, output / "samples" / f"{tag}.png")
        fps = get_preset(config.policy.preset).fps
        media.append(Media("video", "heldout_samples", grid_video(frames[:shown], labels, output / "samples" / f"{tag}.mp4", fps), fps))
        if samples is not None:
            samples[tag] = (frames[:shown], results[:shown])
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
