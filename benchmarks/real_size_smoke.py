"""Real-width CPU smoke: one forked group, its decode and one learner update, with a config's settings.

    python -m benchmarks.real_size_smoke [--config configs/self_forcing.yaml] [--num-layers N] [--full-group]

Builds the config's preset (``self-forcing-1.3b``: width 1536, 30 blocks, 1.42 B parameters) with
random weights in the config's dtype, Wan's real VAE with random weights and a tiny text encoder of
umT5-XXL's output width (4096 x 512 tokens; the 5.7 B-parameter encoder itself is not built). Only
the latent is tiny (``--latent``), so every weight, adapter and dtype path is the real one:

1. the learner's adapter (``lora`` settings, float32, computed in the base dtype) is broadcast in the
   workers' dtype into a worker adapter, as ``LearnerActor.adapter_state`` does;
2. ``fork_group`` (group size, ``rollout.branch_batch_size``) under the worker adapter, then
   ``decode_videos`` through the VAE and ``make_record`` with random rewards;
3. one AR-CoPO update through ``copo_group_backward`` with ``algorithm.micro_batch_size`` and
   ``policy.activation_checkpointing``, gradient clipping and an AdamW step.

Checks dtypes, finiteness and that the update moved every adapter tensor; prints the phase times and
the replay's tensor peak (prefix cache, micro-batches' forwards and backwards) next to the memory
planner's prediction for the same sizes.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from benchmarks.memory_plan import lora_parameters, meta_policy, replay_memory
from benchmarks.real_size import real_size_policy
from benchmarks.tensor_memory import GIB, TensorMemory
from controller.config import Config, load_config
from learner.objectives.copo import copo_group_backward, sample_anchors
from policy.factory import DTYPES, add_adapter
from policy.lora import export_adapter_state, import_adapter_state, set_active_adapter
from policy.presets import get_preset
from reward_service.multi_reward import group_advantages
from rollout_workers.produce import decode_videos, fork_group, make_record
from rollout_workers.tasks import RolloutTask

WORKER_ADAPTER = "worker"
# Default: a smaller group than the paper's G = 12 (each forward reads all 1.4 B weights on the CPU);
# LoRA, dtype, checkpointing and micro-batch stay the config's.
SMALL_GROUP = ["algorithm.group_size=4", "algorithm.anchors_per_group=2", "rollout.branch_batch_size=2"]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"real-size smoke: {what}")


def run_smoke(config: Config, latent: tuple[int, int, int] = (16, 4, 4), num_chunks: int = 2,
              num_layers: int | None = None, seed: int = 0, vae_config: dict | None = None) -> dict:
    alg, dtype = config.algorithm, DTYPES[config.policy.dtype]
    name = alg.effective_adapter_name
    times, t0 = {}, time.perf_counter()
    preset = get_preset(config.policy.preset)
    if num_layers is not None:  # tests: fewer blocks, each at the real width
        from policy.presets import register_preset

        preset = register_preset(preset.model_copy(update={"name": f"{preset.name}-{num_layers}-blocks",
                                                          "transformer": {**preset.transformer, "num_layers": num_layers}}))
    policy = real_size_policy(preset.name, dtype, "cpu", latent_shape=latent, num_chunks=num_chunks, seed=seed,
                              vae_config=vae_config)
    if config.policy.activation_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    add_adapter(policy, name, config.lora)  # the learner's: float32
    add_adapter(policy, WORKER_ADAPTER, config.lora, train=False)  # a worker's: base dtype
    trained = lora_parameters_of(policy, name)
    with torch.no_grad():  # a nonzero B: the broadcast then changes the rollout and every tensor gets gradient
        for p in trained[1::2]:
            p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(seed))
    times["build_s"] = time.perf_counter() - t0

    state = export_adapter_state(policy.transformer, name, dtype=policy.dtype)
    import_adapter_state(policy.transformer, WORKER_ADAPTER, state)
    set_active_adapter(policy.transformer, WORKER_ADAPTER)
    task = RolloutTask(group_id="smoke", prompt="a red fox runs through fresh snow at dawn", noise_seed=seed,
                       pivot=num_chunks - 1, group_size=alg.group_size, sigma=alg.perturbation_sigma, adapter_name=name)
    t0 = time.perf_counter()
    rollout = fork_group(policy, task, config.rollout.branch_batch_size)
    times["rollout_s"] = time.perf_counter() - t0
    _check(rollout.latents.dtype == dtype and bool(torch.isfinite(rollout.latents.float()).all()), "rollout latents")
    t0 = time.perf_counter()
    videos = decode_videos(policy, rollout.latents)
    times["decode_s"] = time.perf_counter() - t0
    frames = videos[0].frames
    _check(len(videos) == alg.group_size and frames.dtype == np.uint8 and frames.shape[-1] == 3, "decoded videos")

    rng = np.random.default_rng(seed)
    rewards = {h: rng.normal(size=alg.group_size) for h in config.reward.weights}
    valid = np.ones(alg.group_size, dtype=bool)
    record = make_record(task, 0, rollout, policy.prompt_key(task.prompt), rewards, valid)
    adv = torch.from_numpy(group_advantages(rewards, config.reward.weights, valid, config.reward.advantage))
    anchors = sample_anchors(alg.group_size, alg.anchors_per_group, torch.Generator().manual_seed(seed))

    set_active_adapter(policy.transformer, name)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    _check(params and all(p.dtype == torch.float32 for p in params), "trainable adapter is not float32")
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=alg.learning_rate, weight_decay=alg.weight_decay)
    for p in params:  # resident from the second update on; the planner counts them apart
        p.grad = torch.zeros_like(p)
    policy.transformer.train()
    mem, t0 = TensorMemory(), time.perf_counter()
    with mem:
        out = copo_group_backward(policy, record, adv, anchors, alg.tau, alg.effective_clip_eps, alg.micro_batch_size)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, alg.max_grad_norm))
    optimizer.step()
    times["update_s"] = time.perf_counter() - t0
    policy.transformer.eval()
    _check(np.isfinite(float(out.loss)) and np.isfinite(grad_norm) and grad_norm > 0, f"loss {out.loss}, grad norm {grad_norm}")
    _check(all(p.grad.dtype == torch.float32 for p in params), "gradients are not float32")
    moved = sum(bool((p != b).any()) for p, b in zip(params, before))
    _check(moved == len(params), f"the update moved {moved} of {len(params)} adapter tensors")

    planned = _planned_update_bytes(config, preset, latent, num_chunks)
    return {**times, "loss": float(out.loss), "grad_norm": grad_norm, "adapter_tensors_moved": f"{moved}/{len(params)}",
            "replay_tensor_peak_gib": mem.peak / GIB, "planned_replay_peak_gib": planned / GIB,
            "kv_cache_dtype": str(policy.new_cache(1).dtype), "num_layers": policy.transformer.config.num_layers}


def lora_parameters_of(policy, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in policy.transformer.named_parameters() if f".{name}." in n and ".lora_" in n]


def _planned_update_bytes(config: Config, preset, latent, num_chunks) -> int:
    """The planner's learner memory above the resident state for the smoke's sizes: the rebuilt prefix
    cache and the peak of one micro-batch's forward + backward."""
    small = preset.model_copy(update={"latent_shape": latent, "num_chunks": num_chunks})
    policy = meta_policy(small, DTYPES[config.policy.dtype], config.lora, trainable=True,
                         checkpointing=config.policy.activation_checkpointing)
    lora = lora_parameters(policy.transformer)
    for p in lora:
        p.grad = torch.zeros_like(p)
    samples = config.algorithm.anchors_per_group * policy.num_steps
    micro = min(samples, config.algorithm.micro_batch_size or samples)
    mem = replay_memory(policy, micro, num_chunks - 1, 512)
    return mem["prefix_cache"] + mem["forward_backward_peak"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/self_forcing.yaml")
    parser.add_argument("--latent", type=int, nargs=3, default=(16, 4, 4), metavar=("C", "H", "W"))
    parser.add_argument("--num-chunks", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=None, help="default: the preset's (30)")
    parser.add_argument("--full-group", action="store_true",
                        help="the config's group size, anchors and branch batch (default: G = 4, 2 anchors, branches 2 at a time)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. algorithm.micro_batch_size=4")
    args = parser.parse_args(argv)
    config = load_config(args.config, ([] if args.full_group else SMALL_GROUP) + args.overrides)
    t0 = time.perf_counter()
    report = run_smoke(config, tuple(args.latent), args.num_chunks, args.num_layers)
    for key, value in report.items():
        print(f"{key:26s} {value:.3f}" if isinstance(value, float) else f"{key:26s} {value}")
    print(f"{'total_s':26s} {time.perf_counter() - t0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
