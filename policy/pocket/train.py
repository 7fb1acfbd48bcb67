"""Train the pocket generator on CPU: flow-matching teacher -> ODE pairs -> 4-step causal student.

    python -m policy.pocket.train                      # the shipped weights (see docs/pocket.md)
    python -m policy.pocket.train --out /tmp/pocket --teacher-steps 20 --ode-pairs 16 --student-steps 20

Every random draw comes from ``--seed`` (data, initial weights, noise, batches), so the command is
reproducible on one machine (CPU kernels may differ in the last bits across machines). The objectives
are in ``policy.pocket.distill``; the geometry and architecture in ``policy.pocket.preset``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from policy.pocket import domain, preset
from policy.pocket.distill import flow_matching_loss, ode_regression_loss, shifted_sigmas, teacher_sample

logger = logging.getLogger(__name__)


class PocketTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    batch_size: int = Field(32, gt=0)
    pool_size: int = Field(4096, gt=0)  # rendered training videos kept in memory
    pool_refresh: int = Field(4, ge=0)  # pool videos re-rendered with fresh seeds after each teacher step
    teacher_steps: int = Field(2500, ge=0)
    teacher_lr: float = Field(5e-4, gt=0)
    teacher_shift: float = Field(3.0, gt=0)  # noise-level sampling and ODE grid
    text_dropout: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(0.998, ge=0, lt=1)
    ode_pairs: int = Field(2048, gt=0)
    ode_steps: int = Field(16, gt=0)
    ode_guidance: float = Field(1.0, ge=1.0)
    ode_batch: int = Field(128, gt=0)
    student_steps: int = Field(1500, ge=0)
    student_lr: float = Field(2e-4, gt=0)
    first_step_prob: float = Field(0.4, ge=0, le=1)  # chance a chunk trains the noise -> video step
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class VideoPool:
    """Rendered training videos (uint8) with their prompt indices; a few are re-rendered each step."""

    def __init__(self, prompts: list[str], size: int, rng: np.random.Generator) -> None:
        self.prompts = prompts
        self.rng = rng
        self.prompt_ids = rng.integers(0, len(prompts), size=size)
        self.videos = np.stack(
            [domain.generate_video(prompts[p], int(rng.integers(2**31))) for p in tqdm(self.prompt_ids, desc="render pool")]
        )

    def refresh(self, count: int) -> None:
        for i in self.rng.integers(0, len(self.videos), size=count):
            self.prompt_ids[i] = self.rng.integers(0, len(self.prompts))
            self.videos[i] = domain.generate_video(self.prompts[self.prompt_ids[i]], int(self.rng.integers(2**31)))

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.integers(0, len(self.videos), size=size)
        return self.videos[idx], self.prompt_ids[idx]


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def _lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(warmup, 1))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def _run_steps(model, ema, steps, lr, cfg, loss_fn, desc) -> list[float]:
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
        _ema_update(ema, model, cfg.ema_decay)
        losses.append(float(loss))
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    return losses


def train_teacher(cfg: PocketTrainConfig, gen: torch.Generator, rng: np.random.Generator):
    """Flow-matching teacher on rendered training videos; returns (EMA teacher, per-step losses)."""
    codec, encoder = preset.pocket_codec(), preset.pocket_text_encoder()
    prompts = domain.train_prompts()
    text_table = encoder.encode(prompts)
    pool = VideoPool(prompts, cfg.pool_size, rng)
    model = preset.new_transformer(seed=cfg.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fpc, chunks = preset.FRAMES_PER_CHUNK, preset.NUM_CHUNKS

    def loss_fn(step: int) -> torch.Tensor:
        videos, ids = pool.batch(cfg.batch_size)
        pool.refresh(cfg.pool_refresh)
        x0 = codec.encode(videos)
        text = text_table[ids].clone()
        text[torch.rand(len(ids), generator=gen) < cfg.text_dropout] = 0.0
        sigmas = shifted_sigmas(torch.rand(len(ids), chunks, generator=gen), cfg.teacher_shift)
        noise = torch.randn(x0.shape, generator=gen)
        return flow_matching_loss(model, x0, noise, sigmas, text, fpc)

    losses = _run_steps(model, ema, cfg.teacher_steps, cfg.teacher_lr, cfg, loss_fn, "teacher")
    return ema, losses


@torch.no_grad()
def make_ode_pairs(teacher, cfg: PocketTrainConfig, gen: torch.Generator, rng: np.random.Generator):
    """(prompt ids, initial noise, teacher endpoints) for ``cfg.ode_pairs`` videos of training prompts."""
    encoder = preset.pocket_text_encoder()
    prompts = domain.train_prompts()
    text_table = encoder.encode(prompts)
    ids = torch.from_numpy(rng.integers(0, len(prompts), size=cfg.ode_pairs))
    frames = preset.FRAMES_PER_CHUNK * preset.NUM_CHUNKS
    noise = torch.randn((cfg.ode_pairs, frames, *preset.LATENT_SHAPE), generator=gen)
    endpoints = torch.empty_like(noise)
    for lo in tqdm(range(0, cfg.ode_pairs, cfg.ode_batch), desc="teacher ODE pairs"):
        hi = min(lo + cfg.ode_batch, cfg.ode_pairs)
        endpoints[lo:hi] = teacher_sample(
            teacher, text_table[ids[lo:hi]], noise[lo:hi], preset.FRAMES_PER_CHUNK,
            cfg.ode_steps, cfg.teacher_shift, cfg.ode_guidance,
        )
    return ids, noise, endpoints


def train_student(teacher, pairs, cfg: PocketTrainConfig, gen: torch.Generator):
    """4-step student initialised from the teacher, by ODE-trajectory regression; returns (EMA student, losses)."""
    ids, noise, endpoints = pairs
    text_table = preset.pocket_text_encoder().encode(domain.train_prompts())
    timesteps = preset.POCKET_PRESET.sampler.timesteps()
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher).eval().requires_grad_(False)
    fpc, chunks, steps = preset.FRAMES_PER_CHUNK, preset.NUM_CHUNKS, len(timesteps)
    later = (1.0 - cfg.first_step_prob) / max(steps - 1, 1)
    step_probs = torch.tensor([cfg.first_step_prob] + [later] * (steps - 1))

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(ids), (cfg.batch_size,), generator=gen)
        chunk_steps = torch.multinomial(step_probs, cfg.batch_size * chunks, replacement=True, generator=gen)
        fresh = torch.randn(endpoints[idx].shape, generator=gen)
        return ode_regression_loss(
            model, noise[idx], endpoints[idx], text_table[ids[idx]], fpc, timesteps,
            chunk_steps.view(cfg.batch_size, chunks), fresh,
        )

    losses = _run_steps(model, ema, cfg.student_steps, cfg.student_lr, cfg, loss_fn, "student")
    return ema, losses


def train(cfg: PocketTrainConfig, out: str | Path) -> dict:
    """The whole pipeline; writes the student's weights and ``pocket.json`` into ``out``; returns the record."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    times = {}
    start = time.perf_counter()
    teacher, teacher_losses = train_teacher(cfg, gen, rng)
    times["teacher_s"] = time.perf_counter() - start
    mark = time.perf_counter()
    pairs = make_ode_pairs(teacher, cfg, gen, rng)
    times["ode_pairs_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    student, student_losses = train_student(teacher, pairs, cfg, gen)
    times["student_s"] = time.perf_counter() - mark
    times["total_s"] = time.perf_counter() - start

    def tail(losses: list[float]) -> float | None:
        return float(np.mean(losses[-50:])) if losses else None

    record = {
        "training": {
            "config": cfg.model_dump(),
            "torch_threads": torch.get_num_threads(),
            "wall_time": {k: round(v, 1) for k, v in times.items()},
            "teacher_loss_first": tail(teacher_losses[:50]),
            "teacher_loss_final": tail(teacher_losses),
            "student_loss_first": tail(student_losses[:50]),
            "student_loss_final": tail(student_losses),
        }
    }
    preset.save_pocket_weights(student, out, record)
    logger.info("pocket generator written to %s in %.1f s", out, times["total_s"])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(preset.WEIGHTS_DIR), help="weights directory (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for name, field in PocketTrainConfig.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PocketTrainConfig(**{k: getattr(args, k) for k in PocketTrainConfig.model_fields})
    record = train(cfg, args.out)
    print(record["training"]["wall_time"], {k: v for k, v in record["training"].items() if "loss" in k})


if __name__ == "__main__":
    main()
