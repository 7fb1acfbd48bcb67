"""Train the pocket generator on CPU: exact-flow teacher ODE pairs -> 4-step causal student -> first step by IMLE.

    python -m pocket.train --out w/              # all three stages, ~28 min (docs/pocket.md: this run, the shipped one)
    python -m pocket.train --out /tmp/pocket --ode-pairs 16 --student-steps 20 --imle-steps 10

Stage 1 draws ODE pairs (initial noise -> real domain video) from the exact probability-flow teacher
of ``pocket.teacher``; stage 2 trains the block-causal student by ODE-trajectory regression at
Self-Forcing's four timesteps (``pocket.distill.ode_regression_loss``); stage 3, at the pocket
sampler's timesteps, retrains the first step so that its output depends on the chunk's initial noise
(``pocket.distill.first_step_imle_loss`` on real alternatives of each chunk) while the later steps
keep the regression loss and, in its last ``--chain-steps`` updates, learn to carry out the first step's
choice on the student's own chain (``pocket.distill.later_steps_chain_loss``). Every random draw comes
from ``--seed`` (pairs, initial weights, batches), so the command is reproducible on one machine (CPU
kernels may differ in the last bits across machines). The architecture and geometry are in
``pocket.preset``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall shared CPUs

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pocket import domain, preset
from pocket.codec import PocketCodec
from pocket.distill import (
    first_step_predictions,
    imle_loss,
    later_steps_chain_loss,
    nearest_alternatives,
    ode_regression_loss,
    start_as_identity_flow,
)
from pocket.teacher import OdePairs, continuation_sets, make_ode_pairs, pair_noise
from policy.sampler import SamplerConfig

logger = logging.getLogger(__name__)


class PocketTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    ode_pairs: int = Field(4096, gt=0)
    candidates_first: int = Field(64, gt=1)  # scenes chunk 0 chooses from (a bank per prompt)
    candidates_next: int = Field(16, gt=1)  # continuations each later chunk chooses from
    ode_steps: int = Field(32, gt=0)
    batch_size: int = Field(16, gt=0)
    student_steps: int = Field(1600, ge=0)
    lr: float = Field(1e-3, gt=0)
    # Stage 2 trains at Self-Forcing's timesteps (shift 5); stage 3 moves the later steps to the pocket
    # sampler's. A from-scratch stage 2 at the pocket's own timesteps (with other changes) did not learn.
    student_shift: float = Field(5.0, gt=0)
    first_step_prob: float = Field(0.4, ge=0, le=1)  # chance a chunk trains the noise -> video step
    context_noise: float = Field(0.3, ge=0)  # max std of the noise added to the teacher-forced context
    first_chunk_weight: float = Field(2.0, gt=0)  # chunk 0's loss weight relative to the others
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    imle_steps: int = Field(450, ge=0)  # stage 3: first step by implicit maximum likelihood (0: skip)
    imle_rows: int = Field(4, gt=0)  # context scenes per stage-3 step
    imle_noises: int = Field(8, gt=1)  # initial noises per context scene
    imle_alternatives: int = Field(8, gt=0)  # real alternatives of each chunk per context scene
    imle_lr: float = Field(5e-4, gt=0)
    sampler_shift: float = Field(preset.POCKET_SHIFT, gt=0)  # the sampler stage 3 trains for and the weights record
    # the last chain_steps updates of stage 3 also run the later steps on the student's own chain from
    # chain_noises of each row's first-step predictions, towards the real chunk each prediction is nearest to
    chain_steps: int = Field(300, ge=0)
    chain_noises: int = Field(2, ge=0)
    chain_alternatives: int = Field(32, gt=0)  # real alternatives the chain's targets are the nearest of
    chain_weight: float = Field(1.0, ge=0)
    init_from: str | None = None  # a weights directory to start stage 3 from, skipping stage 2
    checkpoint_every: int = Field(0, ge=0)  # also write the EMA weights to <out>/<stage>_step_<n> every n steps (0: never)


def _sampler(cfg: PocketTrainConfig) -> SamplerConfig:
    return preset.POCKET_PRESET.sampler.model_copy(update={"shift": cfg.sampler_shift})


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def _lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(warmup, 1))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    decay = min(decay, (1.0 + step) / (10.0 + step))  # short runs: the average must not stay near the init
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def _run_steps(model, ema, steps, lr, cfg, loss_fn, desc, on_checkpoint=None) -> list[float]:
    opt = _optimizer(model, lr)
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, cfg.warmup_steps)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, model, cfg.ema_decay, step)
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if on_checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            on_checkpoint(step + 1, ema, losses)
    return losses


def _pair_regression_loss(model, pairs: OdePairs, codec: PocketCodec, cfg: PocketTrainConfig, gen: torch.Generator,
                          text_table, timesteps, step_probs, chunk_weights) -> torch.Tensor:
    """``ode_regression_loss`` on a random batch of pairs, each chunk at a step drawn from ``step_probs``."""
    chunks = len(chunk_weights)
    idx = torch.randint(0, len(pairs.prompt_ids), (cfg.batch_size,), generator=gen).numpy()
    endpoints = codec.encode(pairs.videos[idx])
    noise = pair_noise(pairs.noise_seeds[idx], endpoints.shape[1], preset.LATENT_SHAPE)
    chunk_steps = torch.multinomial(step_probs, cfg.batch_size * chunks, replacement=True, generator=gen)
    fresh = torch.randn(endpoints.shape, generator=gen)
    text = text_table[torch.from_numpy(pairs.prompt_ids[idx])]
    context_std = cfg.context_noise * torch.rand(cfg.batch_size, 1, 1, 1, 1, generator=gen)
    context = endpoints + context_std * torch.randn(endpoints.shape, generator=gen)
    return ode_regression_loss(
        model, noise, endpoints, text, preset.FRAMES_PER_CHUNK, timesteps, chunk_steps.view(cfg.batch_size, chunks),
        fresh, context, chunk_weights,
    )


def train_student(pairs: OdePairs, codec: PocketCodec, cfg: PocketTrainConfig, gen: torch.Generator, on_checkpoint=None):
    """4-step block-causal student by ODE-trajectory regression; returns (student, its EMA, per-step losses)."""
    text_table = preset.pocket_text_encoder().encode(domain.train_prompts())
    timesteps = SamplerConfig(shift=cfg.student_shift).timesteps()
    model = preset.new_transformer(seed=cfg.seed).train()
    start_as_identity_flow(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    chunks, steps = preset.NUM_CHUNKS, len(timesteps)
    later = (1.0 - cfg.first_step_prob) / max(steps - 1, 1)
    step_probs = torch.tensor([cfg.first_step_prob] + [later] * (steps - 1))
    chunk_weights = torch.tensor([cfg.first_chunk_weight] + [1.0] * (chunks - 1))

    def loss_fn(step: int) -> torch.Tensor:
        return _pair_regression_loss(model, pairs, codec, cfg, gen, text_table, timesteps, step_probs, chunk_weights)

    losses = _run_steps(model, ema, cfg.student_steps, cfg.lr, cfg, loss_fn, "student", on_checkpoint)
    return model, ema, losses


def train_first_step(model, ema, pairs: OdePairs, codec: PocketCodec, cfg: PocketTrainConfig, gen: torch.Generator,
                     on_checkpoint=None):
    """Stage 3, at the sampler's timesteps: the first step by ``first_step_imle_loss`` on real alternatives; the
    later steps keep their ODE-regression loss on the pairs' endpoints and, in the last ``chain_steps`` updates,
    also learn ``later_steps_chain_loss`` on the student's own chain. Returns (EMA student, per-step losses)."""
    prompts = domain.train_prompts()
    text_table = preset.pocket_text_encoder().encode(prompts)  # the pairs' prompt ids index the same list
    timesteps = _sampler(cfg).timesteps()
    fpc, chunks, steps = preset.FRAMES_PER_CHUNK, preset.NUM_CHUNKS, len(timesteps)
    later_steps = torch.tensor([0.0] + [1.0] * (steps - 1))
    chunk_weights = torch.tensor([cfg.first_chunk_weight] + [1.0] * (chunks - 1))
    rng = np.random.default_rng([cfg.seed, 11])
    latent_frames = fpc * chunks

    def loss_fn(step: int) -> torch.Tensor:
        chained = cfg.chain_noises > 0 and step >= cfg.imle_steps - cfg.chain_steps
        n = max(cfg.imle_alternatives, cfg.chain_alternatives if chained else 0)
        sets = continuation_sets(prompts, cfg.imle_rows, n, rng, fpc, codec.time_stride)
        alternatives = codec.encode(sets.alternatives.reshape(-1, *sets.alternatives.shape[2:]))
        alternatives = alternatives.view(cfg.imle_rows, n, *alternatives.shape[1:])
        context = codec.encode(sets.context)
        context = context + cfg.context_noise * torch.rand(cfg.imle_rows, 1, 1, 1, 1, generator=gen) * torch.randn(
            context.shape, generator=gen)
        text = text_table[torch.from_numpy(sets.prompt_ids)]
        noise = torch.randn((cfg.imle_rows, cfg.imle_noises, latent_frames, *preset.LATENT_SHAPE), generator=gen)
        pred = first_step_predictions(model, noise, context, text, fpc)
        loss = imle_loss(pred, alternatives[:, : cfg.imle_alternatives], fpc)
        loss = loss + _pair_regression_loss(model, pairs, codec, cfg, gen, text_table, timesteps, later_steps, chunk_weights)
        if chained:
            m = min(cfg.chain_noises, cfg.imle_noises)
            start = pred[:, :m].detach()
            targets = nearest_alternatives(start, alternatives[:, : cfg.chain_alternatives], fpc).flatten(0, 1)
            fresh = torch.randn((steps - 1, *targets.shape), generator=gen)
            chain = later_steps_chain_loss(model, start.flatten(0, 1), targets, context.repeat_interleave(m, dim=0),
                                           text.repeat_interleave(m, dim=0), fpc, timesteps[1:], fresh)
            loss = loss + cfg.chain_weight * chain
        return loss

    losses = _run_steps(model, ema, cfg.imle_steps, cfg.imle_lr, cfg, loss_fn, "first step", on_checkpoint)
    return ema, losses


def train(cfg: PocketTrainConfig, out: str | Path) -> dict:
    """The whole pipeline; writes the student's weights and ``pocket.json`` into ``out``; returns the record."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    times = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    codec = preset.fit_pocket_codec()
    pairs = make_ode_pairs(
        domain.train_prompts(), cfg.ode_pairs, cfg.seed, codec, preset.FRAMES_PER_CHUNK,
        preset.FRAMES_PER_CHUNK * preset.NUM_CHUNKS, preset.LATENT_SHAPE,
        (cfg.candidates_first, cfg.candidates_next), cfg.ode_steps,
    )
    times["ode_pairs_s"] = time.perf_counter() - start
    mark = time.perf_counter()
    def checkpointer(stage: str):
        def write(step: int, ema, losses: list[float]) -> None:
            record = {"training": {"config": cfg.model_dump(), "stage": stage, "step": step,
                                   f"{stage}_loss_final": float(np.mean(losses[-50:]))}}
            preset.save_pocket_weights(ema, Path(out) / f"{stage}_step_{step:05d}", record, codec, _sampler(cfg))
        return write

    if cfg.init_from:
        student = preset.load_pocket_policy(cfg.init_from).transformer
        model = copy.deepcopy(student).train().requires_grad_(True)
        losses: list[float] = []
    else:
        model, student, losses = train_student(pairs, codec, cfg, gen, checkpointer("student"))
    times["student_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    first_step_losses: list[float] = []
    if cfg.imle_steps:
        student, first_step_losses = train_first_step(model, student, pairs, codec, cfg, gen, checkpointer("first_step"))
    times["first_step_s"] = time.perf_counter() - mark
    times["total_s"] = time.perf_counter() - start
    times["process_cpu_s"] = time.process_time() - cpu_start

    def tail(values: list[float]) -> float | None:
        return float(np.mean(values[-50:])) if values else None

    record = {
        "training": {
            "config": cfg.model_dump(),
            "torch_threads": torch.get_num_threads(),
            "wall_time": {k: round(v, 1) for k, v in times.items()},
            "student_loss_first": tail(losses[:50]),
            "student_loss_final": tail(losses),
            "first_step_loss_first": tail(first_step_losses[:50]),
            "first_step_loss_final": tail(first_step_losses),
        }
    }
    if cfg.init_from:
        record["training"]["initial_weights"] = preset.read_pocket_record(cfg.init_from).get("training")
    preset.save_pocket_weights(student, out, record, codec, _sampler(cfg))
    logger.info("pocket generator written to %s in %.1f s", out, times["total_s"])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(preset.WEIGHTS_DIR), help="weights directory (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for name, field in PocketTrainConfig.model_fields.items():
        kind = str if field.default is None else type(field.default)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PocketTrainConfig(**{k: getattr(args, k) for k in PocketTrainConfig.model_fields})
    record = train(cfg, args.out)
    print(record["training"]["wall_time"], {k: v for k, v in record["training"].items() if "loss" in k})


if __name__ == "__main__":
    main()
