"""Long videos as LongLive runs them: a cache bounded by the window, prompt switches with KV re-cache,
and a pivot anywhere whose context the learner rebuilds from the sink and the window alone."""

from __future__ import annotations

import pytest
import torch

from policy.kv_cache import KVCache
from policy.noise_plan import NoisePlan
from policy.presets import TINY_TRANSFORMER, build_policy, get_preset
from policy.recache import TextSchedule, check_prompt_schedule, encode_schedule, rebuild_context
from policy.rollout import generate, rollout_group, rollout_prefix
from policy.sampler import renoise, x0_from_flow
from tests.policy.conftest import ToyTextEncoder, make_policy
from tests.policy.long_video_reference import frames_of, join, run_frames

A, B = "a red fox runs through snow", "the fox stops and looks up at the moon"


def plan_for(policy, seed=3):
    return NoisePlan.from_seed(seed, policy.num_chunks, policy.frames_per_chunk, policy.latent_shape, policy.num_steps)


def long_window_policy(num_chunks=10):
    return make_policy("tiny-window", num_chunks=num_chunks)  # 1-frame chunks, window 4 with 1 sink


class CacheWatch:
    """Peak frames held, peak attended key tokens and every buffer size of every cache in use."""

    def __init__(self, monkeypatch):
        self.peak_frames = self.peak_keys = 0
        self.buffer_frames: set[int] = set()
        plan, attend = KVCache.plan_chunk, KVCache.attend

        def plan_spy(cache, *args, **kwargs):
            out = plan(cache, *args, **kwargs)
            self.peak_frames = max(self.peak_frames, len(cache.cached_frames))
            self.buffer_frames.update(k.shape[1] // cache.tokens_per_frame for k in cache.keys)
            return out

        def attend_spy(cache, *args, **kwargs):
            keys, values = attend(cache, *args, **kwargs)
            self.peak_keys = max(self.peak_keys, keys.shape[1])
            return keys, values

        monkeypatch.setattr(KVCache, "plan_chunk", plan_spy)
        monkeypatch.setattr(KVCache, "attend", attend_spy)


def test_longlive_long_preset_makes_120_frames_with_a_cache_bounded_by_the_window(monkeypatch):
    real = get_preset("longlive-1.3b-long")
    assert (real.num_chunks * real.frames_per_chunk, real.local_window, real.sink_frames) == (120, 12, 3)
    tiny = real.model_copy(update={"transformer": dict(TINY_TRANSFORMER, num_layers=1), "latent_shape": (4, 2, 2),
                                   "checkpoint_kind": "random"})
    policy = build_policy(tiny, text_encoder=ToyTextEncoder(dim=TINY_TRANSFORMER["text_dim"]), seed=1)
    watch = CacheWatch(monkeypatch)
    video = generate(policy, policy.text_conditioning([A]), plan_for(policy)).latents
    assert video.shape == (120, 4, 2, 2) and torch.isfinite(video).all()
    assert watch.peak_frames == 12 and watch.buffer_frames == {12}  # never more than the window
    assert watch.peak_keys == 12 * policy.tokens_per_frame


def test_long_windowed_streaming_equals_a_dense_teacher_forced_forward():
    """The last chunk of a 30-chunk windowed video against one dense forward under the window mask."""
    policy = make_policy("tiny-window", num_chunks=30)
    policy.recache_at_pivot = False  # plain streaming, as generation does
    text = policy.text_conditioning([A])
    group = rollout_group(policy, text, plan_for(policy).fork(pivot=29, group_size=1, sigma=0.0))
    clean = group.latents[:, :30]
    for k in range(policy.num_steps):
        noisy = clean.clone()
        noisy[:, 29:] = group.pivot_inputs[:, k]
        t = torch.zeros(1, 30)
        t[:, 29] = group.timesteps[k]
        flow = policy.transformer.forward_dense(noisy, t, text, 1, clean_latents=clean, local_window=4, sink_frames=1)
        x0 = x0_from_flow(noisy[:, 29:], flow[:, 29:], policy.sampler.sigmas(group.timesteps[k : k + 1]))
        assert (x0 - group.pivot_x0[:, k]).abs().max() < 1e-5


def test_prompt_schedule_is_checked():
    assert check_prompt_schedule([(0, A), (3, B)], num_chunks=6) == [(0, A), (3, B)]
    for bad, match in [([(1, A)], "start at chunk 0"), ([(0, A), (3, B), (3, A)], "strictly increasing"),
                       ([(0, A), (6, B)], "6 chunks")]:
        with pytest.raises(ValueError, match=match):
            check_prompt_schedule(bad, num_chunks=6)


@pytest.mark.parametrize("switch", [2, 7])  # inside the first window (all rewritten) / past it (sink kept)
def test_prompt_switch_changes_later_chunks_only(switch):
    policy = long_window_policy()
    plan = plan_for(policy)
    one = generate(policy, policy.text_conditioning([A]), plan).latents
    two = generate(policy, encode_schedule(policy, [(0, A), (switch, B)]), plan).latents
    assert torch.equal(one[:switch], two[:switch])
    assert all((one[c] - two[c]).abs().max() > 1e-3 for c in range(switch, policy.num_chunks))


@pytest.mark.parametrize("switch", [2, 7])
def test_prompt_switch_recache_equals_an_independent_computation(switch):
    """Chunk ``switch`` after a re-cache, recomputed with explicit key sets: LongLive's sink (frame 0,
    prompt A), the re-run window under prompt B, then the chunk's own denoising under B."""
    policy = long_window_policy()
    model, tpf, w = policy.transformer, policy.tokens_per_frame, policy.local_window
    plan = plan_for(policy)
    video = generate(policy, encode_schedule(policy, [(0, A), (switch, B)]), plan).latents[None]
    text_a, text_b = policy.text_conditioning([A]), policy.text_conditioning([B])
    with torch.no_grad():
        if switch <= w:  # every cached frame re-run under B, each seeing all of them
            _, context = run_frames(model, video[:, :switch], 0.0, 0, text_b)
            visible = join(frames_of(context, [0], tpf), frames_of(context, range(max(1, switch - 2), switch), tpf))
        else:  # sink frame 0 as chunk 0 wrote it (prompt A); window frames switch-4..switch-1 re-run under B
            _, sink = run_frames(model, video[:, :1], 0.0, 0, text_a)
            window = video[:, switch - w : switch]
            _, ring = run_frames(model, window, 0.0, switch - w, text_b, context=sink, keep_from=1)
            visible = join(sink, frames_of(ring, [1, 2], tpf))  # the chunk evicts the oldest ring frame
        x = plan.initial[switch][None]
        ts = policy.timesteps(chunk=switch)
        sig = policy.sampler.sigmas(ts)
        for k in range(len(ts)):
            flow, _ = run_frames(model, x, ts[k], switch, text_b, context=visible)
            x0 = x0_from_flow(x, flow, sig[k])
            if k + 1 < len(ts):
                x = renoise(x, x0, sig[k], sig[k + 1], plan.renoise[switch, k][None])
    assert (x0[0] - video[0, switch]).abs().max() < 1e-5


def test_group_rollout_follows_the_prompt_schedule():
    policy = long_window_policy(num_chunks=8)
    texts = encode_schedule(policy, [(0, A), (2, B), (6, A)])  # one switch in the prefix, one after the pivot
    group_plan = plan_for(policy).fork(pivot=4, group_size=2, sigma=0.5)
    group = rollout_group(policy, texts, group_plan)
    for i in range(2):
        alone = generate(policy, texts, group_plan.branch(i)).latents
        assert (group.latents[i] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("pivot", [6, 9])
@pytest.mark.parametrize("schedule", [[(0, A)], [(0, A), (3, B)], [(0, A), (6, B)], [(0, A), (4, B), (8, A)]])
def test_learner_rebuilds_the_rollouts_cache_from_the_window(pivot, schedule):
    policy = long_window_policy()
    texts = encode_schedule(policy, schedule)
    prefix, cache, recached = rollout_prefix(policy, texts, plan_for(policy), pivot)
    assert recached  # past the first window: the rollout re-caches at the pivot
    calls = policy.transformer.forward_calls
    rebuilt = rebuild_context(policy, texts, prefix)
    # sink chunk + chunks up to frame W + the pivot's re-cache (+ one re-cache for a switch inside the window)
    assert policy.transformer.forward_calls - calls == 4 + 1 + (1 if schedule[1:2] and schedule[1][0] <= 4 else 0)
    assert rebuilt.slot_frames == cache.slot_frames == [0, *sorted(range(pivot - 3, pivot), key=lambda f: (f - 1) % 3)]
    for layer in range(policy.transformer.config.num_layers):
        assert (rebuilt.keys[layer] - cache.keys[layer]).abs().max() < 1e-6
        assert (rebuilt.values[layer] - cache.values[layer]).abs().max() < 1e-6
        assert (rebuilt.text_keys[layer] - cache.text_keys[layer]).abs().max() < 1e-6


def test_a_far_pivot_replays_its_recorded_trajectory_and_matches_a_lone_video():
    from policy.pivot_replay import replay_pivot_chunk

    policy = long_window_policy()
    texts = encode_schedule(policy, [(0, A), (5, B)])
    group_plan = plan_for(policy).fork(pivot=8, group_size=3, sigma=0.5)
    group = rollout_group(policy, texts, group_plan)
    assert group.recached_at_pivot
    with torch.no_grad():
        x0 = replay_pivot_chunk(policy, texts, group.prefix_latents, group.pivot_inputs.flatten(0, 1),
                                group.timesteps.repeat(3))
    assert (x0 - group.pivot_x0.flatten(0, 1)).abs().max() < 1e-5
    alone = generate(policy, texts, group_plan.branch(1), recache_at={8}).latents
    assert (group.latents[1] - alone).abs().max() < 1e-5


def test_text_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="one prompt"):
        TextSchedule.of(torch.zeros(2, 4, 8))
    policy = long_window_policy(num_chunks=4)
    with pytest.raises(ValueError, match="4 chunks"):
        encode_schedule(policy, [(0, A), (4, B)])
