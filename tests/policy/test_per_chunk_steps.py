"""Per-chunk step lists: Causal-Forcing++ frame-wise checkpoints run chunk 0 in 4 steps, later chunks in 2 or 1."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import TINY_WAN_CONFIG, save_causal_forcing, tiny_transformer

from policy.noise_plan import NoisePlan
from policy.pivot_replay import replay_pivot_chunk
from policy.presets import build_policy, get_preset
from policy.rollout import generate, rollout_group
from policy.sampler import SamplerConfig
from policy.transformer_causal_wan import CausalWanTransformer3DModel
from tests.policy.conftest import ToyTextEncoder

# Upstream's warped schedule (Causal-Forcing pipeline/causal_inference.py: scheduler.timesteps[1000 - step],
# shift 5): 1000 -> 1000, 750 -> 937.5, 500 -> 833.33.., 250 -> 625.
FIRST = [1000.0, 937.5, 2500.0 / 3.0, 625.0]
LATER = {"2step": [1000.0, 2500.0 / 3.0], "1step": [1000.0]}


def _policy(tmp_path, variant: str, num_chunks: int = 4):
    """A tiny Causal-Forcing++ file (Causal-Forcing's frame-wise layout, EMA weights) loaded by its preset."""
    source = tiny_transformer(CausalWanTransformer3DModel, seed=5)
    path = save_causal_forcing(tmp_path / f"framewise-{variant}.pt", source, "framewise")
    real = get_preset(f"causal-forcing-pp-framewise-{variant}-1.3b")
    preset = real.model_copy(update={
        "name": f"tiny-cfpp-{variant}", "transformer": dict(TINY_WAN_CONFIG), "latent_shape": (4, 4, 4),
        "num_chunks": num_chunks, "checkpoint_path": str(path),
    })
    return build_policy(preset, text_encoder=ToyTextEncoder(dim=TINY_WAN_CONFIG["text_dim"]), codec=object())


class TimestepLog:
    """Records the timestep of every chunk forward (the first frame's; all frames of a chunk share it)."""

    def __init__(self, model):
        self.seen: list[float] = []
        self.model, self.original = model, model.forward_chunk

        def spy(latents, timesteps, *args, **kwargs):
            self.seen.append(float(timesteps.reshape(-1)[0]))
            return self.original(latents, timesteps, *args, **kwargs)

        model.forward_chunk = spy

    def close(self):
        del self.model.forward_chunk  # back to the class's method


def _reference_video(policy, text, plan: NoisePlan, lists: list[list[float]]) -> torch.Tensor:
    """Upstream's loop written out: per chunk its own list, x0 = x - s v, x' = (1 - s') x0 + s' eps, then a
    t = 0 pass writing the cache."""
    model, f = policy.transformer, policy.frames_per_chunk
    cache = policy.new_cache(1)
    out = []
    for c in range(policy.num_chunks):
        ts = lists[c]
        x = plan.initial[c][None].double()
        for k, t in enumerate(ts):
            flow = model.forward_chunk(x.float(), torch.full((1, f), t), cache, c * f, text).double()
            x0 = x - t / 1000.0 * flow
            if k + 1 < len(ts):
                s_next = ts[k + 1] / 1000.0
                x = (1 - s_next) * x0 + s_next * plan.renoise[c, k][None].double()
        model.forward_chunk(x0.float(), torch.zeros(1, f), cache, c * f, text)
        out.append(x0[0].float())
    return torch.cat(out)


@pytest.mark.parametrize("variant", ["2step", "1step"])
def test_causal_forcing_pp_generation_runs_each_chunk_on_its_own_list(tmp_path, variant):
    policy = _policy(tmp_path, variant)
    assert policy.sampler.warped_timesteps(chunk=0) == pytest.approx(FIRST, abs=1e-9)
    assert policy.sampler.warped_timesteps(chunk=3) == pytest.approx(LATER[variant], abs=1e-9)
    assert policy.num_steps == 4  # the plan holds the longest list's draws
    text = policy.text_conditioning(["a kite over the sea"])
    plan = NoisePlan.from_seed(3, policy.num_chunks, 1, policy.latent_shape, policy.num_steps)

    log = TimestepLog(policy.transformer)
    with torch.no_grad():
        video = generate(policy, text, plan)
    log.close()
    lists = [FIRST] + [LATER[variant]] * (policy.num_chunks - 1)
    expected_seen = [t for ts in lists for t in [*ts, 0.0]]
    assert log.seen == pytest.approx(expected_seen, abs=1e-3)
    assert video.forward_passes == sum(len(ts) + 1 for ts in lists)  # 5 + 3 * (T_later + 1)

    with torch.no_grad():
        reference = _reference_video(policy, text, plan, lists)
    assert (video.latents - reference).abs().max() < 1e-4
    with torch.no_grad():  # the single-list schedule (every chunk in 4 steps) is a different video
        uniform = _reference_video(policy, text, plan, [FIRST] * policy.num_chunks)
    assert (video.latents[1:] - uniform[1:]).abs().max() > 1e-2


@pytest.mark.parametrize("pivot", [0, 2])
def test_a_group_records_and_replays_its_pivot_chunks_own_list(tmp_path, pivot):
    policy = _policy(tmp_path, "2step")
    text = policy.text_conditioning(["a kite over the sea"])
    plan = NoisePlan.from_seed(4, policy.num_chunks, 1, policy.latent_shape, policy.num_steps)
    for group_plan in (plan.fork(pivot, 3, 0.5), plan.fork_renoise(pivot, 3)):
        group = rollout_group(policy, text, group_plan)
        T = len(FIRST if pivot == 0 else LATER["2step"])
        assert group.timesteps.tolist() == pytest.approx(FIRST if pivot == 0 else LATER["2step"], abs=1e-3)
        assert group.pivot_inputs.shape[1] == group.pivot_x0.shape[1] == T
        for i in range(3):  # each branch is the standalone rollout of its plan (same slice of re-noise draws)
            alone = generate(policy, text, group_plan.branch(i)).latents
            assert (group.latents[i] - alone).abs().max() < 1e-5
        with torch.no_grad():  # pivot replay at the recorded steps reproduces the recorded x0
            for k in range(T):
                x0 = replay_pivot_chunk(policy, text, group.prefix_latents, group.pivot_inputs[:, k], group.timesteps[k])
                assert (x0 - group.pivot_x0[:, k]).abs().max() < 1e-5
    group_plan = plan.fork_renoise(pivot, 3)
    renoise_group = rollout_group(policy, text, group_plan)
    gap = (renoise_group.pivot_inputs[1] - renoise_group.pivot_inputs[0]).flatten(1).abs().amax(1)
    assert gap[0] == 0 and gap[1] > 1e-2  # SDE-GRPO: branches part at the pivot's first re-noise
    # The recorded transitions are the ones SDE-GRPO scores with sigmas of the recorded timesteps:
    # x_{k+1} = (1 - s_{k+1}) x0_k + s_{k+1} eps_k, eps_k the branch's k-th draw of the plan.
    s = renoise_group.timesteps.double() / 1000.0
    for k in range(len(s) - 1):
        want = (1 - s[k + 1]) * renoise_group.pivot_x0[:, k].double() + s[k + 1] * group_plan.pivot_renoise[:, k].double()
        assert (renoise_group.pivot_inputs[:, k + 1].double() - want).abs().max() < 1e-5


def test_step_list_needs_the_chunk_when_lists_differ():
    sampler = SamplerConfig(denoising_step_list=(1000, 500), first_chunk_step_list=(1000, 750, 500, 250))
    with pytest.raises(ValueError, match="chunk="):
        sampler.timesteps()
    assert sampler.chunk_num_steps(0) == 4 and sampler.chunk_num_steps(7) == 2
    assert SamplerConfig(first_chunk_step_list=(1000, 750, 500, 250)).timesteps().shape == (4,)  # same lists
    with pytest.raises(ValueError, match="first_chunk_step_list must be strictly decreasing"):
        SamplerConfig(first_chunk_step_list=(500, 750))
    with pytest.raises(ValueError, match=r"first_chunk_step_list entries \[0\]"):
        SamplerConfig(first_chunk_step_list=(1000, 0))


def test_sde_grpo_in_a_one_step_chunk_is_refused(tmp_path):
    policy = _policy(tmp_path, "1step")
    plan = NoisePlan.from_seed(4, policy.num_chunks, 1, policy.latent_shape, policy.num_steps)
    text = policy.text_conditioning(["x"])
    with pytest.raises(ValueError, match=r"needs >= 2 steps in the pivot chunk; chunk 2 has \(1000,\)"):
        rollout_group(policy, text, plan.fork_renoise(2, 2))
    assert rollout_group(policy, text, plan.fork_renoise(0, 2)).timesteps.shape == (4,)
