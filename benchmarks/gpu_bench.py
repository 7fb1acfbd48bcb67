"""Real-size speed and memory on one GPU, random weights (no download): one table.

    python -m benchmarks.gpu_bench [--config configs/self_forcing.yaml] [--dry-run]

Builds the config's preset at its real size (Wan2.1-1.3B block-causal, 480x832, 21 latent frames)
and Wan's real VAE, both random, in the config's dtype, with a tiny text encoder of umT5-XXL's
output width (the encoder runs once a prompt; it is not what is measured). Measures:

- generation of one video and of one forked group (``algorithm.group_size``, pivot in the middle,
  ``rollout.branch_batch_size``): video frames/s, and the group's speed-up over G single videos
  against the counted forward ratio ``G x forwards(one video) / forwards(group)``;
- the VAE decode of one video;
- one AR-CoPO learner update (``copo_group_backward`` with the config's micro-batch and activation
  checkpointing, gradient clipping, AdamW), after one warm-up update: time, and peak memory against
  the memory planner (``benchmarks.memory_plan``);
- the LoRA broadcast: the adapter exported in the workers' dtype and imported into a worker adapter;
- model FLOPs utilisation of generation and update: FLOPs counted by ``FlopCounterMode`` running the
  same code on meta tensors (no recomputation counted), over the measured time and the card's dense
  bf16 peak (looked up from the device name).

``--dry-run`` runs the same code on the CPU at the ``tiny`` preset and a tiny VAE, in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.memory_plan import lora_parameters, meta_policy, plan_learner, replay_memory
from benchmarks.real_size import real_size_policy
from benchmarks.tensor_memory import GIB, TensorMemory
from controller.config import Config, load_config
from learner.objectives.copo import copo_group_backward, sample_anchors
from policy.factory import DTYPES, add_adapter
from policy.lora import export_adapter_state, import_adapter_state, set_active_adapter
from policy.noise_plan import NoisePlan
from policy.pivot_replay import replay_pivot_chunk
from policy.presets import get_preset
from policy.rollout import generate, rollout_group
from reward_service.multi_reward import group_advantages
from rollout_workers.produce import make_record
from rollout_workers.tasks import RolloutTask

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; matched in this order.
BF16_DENSE_PEAK = (("H200 NVL", 835e12), ("H200", 989.4e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
                   ("H100", 989.4e12), ("A100", 312e12))
DRY_RUN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
PROMPT = "a red fox runs through fresh snow at dawn, cinematic lighting"


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 4 else f"{nbytes / 2**20:.1f} MiB"


def peak_for_name(name: str) -> float | None:
    return next((peak for key, peak in BF16_DENSE_PEAK if key in name), None)


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, peak_for_name(name)


class Meter:
    """Wall time (GPU synchronised) and peak tensor memory of a block, on CUDA or on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[], object]) -> tuple[object, float, int, int]:
        """(result, seconds, peak bytes in use during fn, bytes in use before it)."""
        self.sync()
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(self.device), before
        mem = TensorMemory()
        t0 = time.perf_counter()
        with mem:
            out = fn()
        return out, time.perf_counter() - t0, mem.peak, 0


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _group_plan(policy, group_size: int, seed: int = 0):
    plan = NoisePlan.from_seed(seed, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)
    return plan, plan.fork(policy.num_chunks // 2, group_size, 0.5)


def _meta_flops(config: Config, preset, micro: int, group_size: int, branch: int) -> dict[str, int]:
    """Model FLOPs of one video, one group and one micro-batch's replay (forward + backward) on meta."""
    dtype = DTYPES[config.policy.dtype]
    policy = meta_policy(preset, dtype, config.lora)
    text = torch.zeros(1, 512, preset.transformer["text_dim"], device="meta", dtype=dtype)
    plan, group = _group_plan(policy, group_size)
    with torch.no_grad():
        video = counted_flops(lambda: generate(policy, text, plan))
        forked = counted_flops(lambda: rollout_group(policy, text, group, branch_batch_size=branch))
    learner = meta_policy(preset, dtype, config.lora, trainable=True)
    pivot, f = policy.num_chunks // 2, policy.frames_per_chunk
    prefix = torch.zeros(pivot * f, *policy.latent_shape, device="meta")
    x_t = torch.zeros(micro, f, *policy.latent_shape, device="meta")
    steps = torch.full((micro,), 500.0, device="meta")
    replay = counted_flops(lambda: replay_pivot_chunk(learner, text, prefix, x_t, steps).float().sum().backward())
    return {"video": video, "group": forked, "replay_micro_batch": replay}


def run_bench(config: Config, dry_run: bool) -> tuple[list[tuple[str, str, str]], dict[str, float]]:
    """The table's rows (measure, value, what it is held against) and the raw numbers behind them."""
    alg = config.algorithm
    device = torch.device("cpu" if dry_run else "cuda")
    dtype = DTYPES[config.policy.dtype]
    preset_name = "tiny" if dry_run else config.policy.preset
    preset = get_preset(preset_name)
    g, branch = alg.group_size, config.rollout.branch_batch_size or alg.group_size
    meter, rows = Meter(device), []
    card, peak_flops = bf16_peak(device)

    small = dict(latent_shape=(4, 4, 4), num_chunks=2, vae_config=DRY_RUN_VAE) if dry_run else {}
    policy = real_size_policy(preset_name, dtype, device, **small)
    preset = preset.model_copy(update={"latent_shape": policy.latent_shape, "num_chunks": policy.num_chunks})
    if config.policy.activation_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    name = alg.effective_adapter_name
    add_adapter(policy, name, config.lora)
    add_adapter(policy, "worker", config.lora, train=False)
    text = policy.text_conditioning([PROMPT])
    video_frames = 1 + 4 * (policy.num_frames - 1)
    rows.append(("device", card, f"{preset_name}, {policy.num_frames} latent frames {policy.latent_shape}, {dtype}"))

    # LoRA broadcast: export in the workers' dtype, import into the worker adapter (what a worker runs).
    def broadcast():
        state = export_adapter_state(policy.transformer, name, dtype=policy.dtype)
        import_adapter_state(policy.transformer, "worker", state)
        return sum(t.numel() * t.element_size() for t in state.values())

    size, t_cast, _, _ = meter.run(broadcast)
    rows.append(("lora broadcast", f"{size / 2**20:.1f} MiB in {t_cast:.3f} s", "export (device->host, cast) + import"))

    set_active_adapter(policy.transformer, "worker")
    plan, group_plan = _group_plan(policy, g)
    with torch.no_grad():
        generate(policy, text, plan)  # warm-up (kernels, allocator)
        one, t_one, peak_one, _ = meter.run(lambda: generate(policy, text, plan))
        group, t_group, peak_group, _ = meter.run(lambda: rollout_group(policy, text, group_plan, branch_batch_size=branch))
    counted_ratio = g * one.forward_passes / group.forward_passes
    raw = {"video_forwards": one.forward_passes, "group_forwards": group.forward_passes, "counted_ratio": counted_ratio,
           "speedup": g * t_one / t_group, "broadcast_bytes": size}
    rows.append(("generate 1 video", f"{video_frames / t_one:.1f} frames/s ({t_one:.2f} s)", f"peak {_size(peak_one)}"))
    rows.append((f"forked group G={g}, batch {branch}", f"{g * video_frames / t_group:.1f} frames/s ({t_group:.2f} s)",
                 f"peak {_size(peak_group)}"))
    rows.append(("group speed-up vs G videos", f"{g * t_one / t_group:.2f}x", f"counted forward ratio {counted_ratio:.2f}x"))

    with torch.no_grad():
        _, t_dec, peak_dec, _ = meter.run(lambda: policy.codec.to_pixels(group.latents[:1]))
    rows.append(("VAE decode 1 video", f"{t_dec:.2f} s", f"peak {_size(peak_dec)}"))

    # One AR-CoPO update on the group just generated, random rewards; the second one is measured.
    rng = np.random.default_rng(0)
    rewards = {h: rng.normal(size=g) for h in config.reward.weights}
    valid = np.ones(g, dtype=bool)
    task = RolloutTask(group_id="bench", prompt=PROMPT, noise_seed=0, pivot=group.pivot, group_size=g,
                       sigma=group.sigma, adapter_name=name)
    record = make_record(task, 0, group, policy.prompt_key(PROMPT), rewards, valid)
    adv = torch.from_numpy(group_advantages(rewards, config.reward.weights, valid, config.reward.advantage))
    anchors = sample_anchors(g, alg.anchors_per_group, torch.Generator().manual_seed(0))
    set_active_adapter(policy.transformer, name)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=alg.learning_rate)
    del group, one
    policy.transformer.train()

    def update():
        optimizer.zero_grad(set_to_none=False)
        copo_group_backward(policy, record, adv, anchors, alg.tau, alg.effective_clip_eps, alg.micro_batch_size)
        torch.nn.utils.clip_grad_norm_(params, alg.max_grad_norm)
        optimizer.step()

    update()
    _, t_update, peak_update, before_update = meter.run(update)
    policy.transformer.eval()
    samples = alg.anchors_per_group * policy.num_steps
    micro = min(samples, alg.micro_batch_size or samples)
    planned = _planned_update(config, preset, micro, record.pivot)
    raw.update(update_bytes=peak_update - before_update, planned_update_bytes=planned, update_s=t_update)
    rows.append(("learner update", f"{t_update:.2f} s", f"{samples} samples, micro-batch {micro}, "
                 f"checkpointing {'on' if config.policy.activation_checkpointing else 'off'}"))
    rows.append(("update memory above resident", _size(peak_update - before_update),
                 f"planner {_size(planned)} (prefix cache + one micro-batch)"))
    if not dry_run:
        full = plan_learner(config)
        te = full.parts.get("text_encoder_umt5_xxl", 0.0)
        rows.append(("update peak (allocated)", f"{peak_update / GIB:.2f} GiB",
                     f"planner learner peak {full.peak_gib:.2f} GiB, {full.peak_gib - te:.2f} without umT5-XXL (not built here)"))

    flops = _meta_flops(config, preset, micro, g, branch)
    update_flops = flops["replay_micro_batch"] * -(-samples // micro)
    for label, count, seconds in (("MFU generate 1 video", flops["video"], t_one), ("MFU forked group", flops["group"], t_group),
                                  ("MFU learner update", update_flops, t_update)):
        achieved = count / seconds
        mfu = f"{100 * achieved / peak_flops:.1f} %" if peak_flops else "n/a (no GPU peak)"
        rows.append((label, mfu, f"{count / 1e12:.3g} TFLOP counted, {achieved / 1e12:.3g} TFLOP/s"))
        raw[label] = count
    return rows, raw


def _planned_update(config: Config, preset, micro: int, pivot: int) -> int:
    policy = meta_policy(preset, DTYPES[config.policy.dtype], config.lora, trainable=True,
                         checkpointing=config.policy.activation_checkpointing)
    for p in lora_parameters(policy.transformer):
        p.grad = torch.zeros_like(p)
    mem = replay_memory(policy, micro, pivot, 512)
    return mem["prefix_cache"] + mem["forward_backward_peak"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/self_forcing.yaml")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the code path)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. algorithm.group_size=4")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows, _ = run_bench(config, args.dry_run)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':{width}s} | {'value':34s} | against")
    print("-" * (width + 60))
    for label, value, ref in rows:
        print(f"{label:{width}s} | {value:34s} | {ref}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
