"""The learner's door and its update guard, on the real pocket learner (no Ray): every kind of
poison group is quarantined with its reason while the good groups train; a reference buffer's poison
is quarantined, never sampled; a non-finite step leaves the adapter as it was and N in a row stop the
run; a store whose applied set was lost is refused at restore."""

from __future__ import annotations

import math

import pytest
import redis
import torch

import replay
from controller.config import CONFIG_DIR, load_config
from learner.learner_actor import Learner
from learner.messages import UpdateStats
from controller.metrics import ProjectMetrics
from learner.nonfinite_guard import NonFiniteUpdateError
from policy.lora import export_adapter_state
from pocket import domain
from replay.synthetic import synthetic_group
from rollout_workers.simulated import preset_geometry

PROMPTS = domain.train_prompts()
GEOMETRY = preset_geometry("pocket")
SMALL = ["lora.rank=2", "lora.alpha=4", "algorithm.group_size=4", "algorithm.anchors_per_group=2",
         "algorithm.updates_per_iteration=1", "algorithm.max_nonfinite_steps=2"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def good(i: int, **geometry):
    g = synthetic_group(**{**GEOMETRY, **geometry}, group_size=4, pivot=1, group_id=f"good-{i}", seed=i,
                        heads=("VQ", "MQ", "TA"))
    return g.model_copy(update={"prompt": PROMPTS[i % len(PROMPTS)], "reward_valid": torch.ones(4, dtype=torch.bool)})


def poison(kind: str):
    """One group of each kind the codec accepts but the learner cannot use, and the reason expected."""
    g = good(100).model_copy(update={"group_id": f"poison-{kind}"})
    if kind == "nan_reward":
        rewards = dict(g.rewards, TA=torch.tensor([0.1, math.nan, 0.3, 0.2], dtype=torch.float64))
        return g.model_copy(update={"rewards": rewards}), "reward"
    if kind == "wrong_geometry":
        return good(101, height=4).model_copy(update={"group_id": f"poison-{kind}"}), "geometry"
    if kind == "zero_size":
        return good(102, width=0).model_copy(update={"group_id": f"poison-{kind}"}), "geometry"
    if kind == "nan_pivot_x0":
        x0 = g.pivot_x0.clone()
        x0[1, 2, 0, 3] = math.nan  # one latent channel of one frame: 8 x 8 values
        return g.model_copy(update={"pivot_x0": x0}), "nonfinite"
    if kind == "inf_pivot_inputs":
        inputs = g.pivot_inputs.clone()
        inputs[0, 0, 1, 0, 0, 0] = math.inf
        return g.model_copy(update={"pivot_inputs": inputs}), "nonfinite"
    if kind == "unencodable_prompt":
        return g.model_copy(update={"prompt": "a purple elephant juggling"}), "prompt"
    if kind == "future_version":
        return g.model_copy(update={"policy_version": 1000}), "policy_version"
    raise ValueError(kind)


KINDS = ["nan_reward", "wrong_geometry", "zero_size", "nan_pivot_x0", "inf_pivot_inputs", "unencodable_prompt",
         "future_version"]


def learner(weights, store_url: str, root, *overrides: str, config_file=None) -> Learner:
    config = load_config(config_file, [f"policy.transformer_checkpoint={weights}", *SMALL, *overrides])
    return Learner(config.learner_settings().model_dump(mode="json"), store_url, str(root))


def adapter(lrn: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in export_adapter_state(lrn.policy.transformer, lrn.adapter).items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_each_kind_of_poison_is_quarantined_and_the_good_groups_train(untrained_pocket_weights, tmp_path):
    url = (tmp_path / "store").as_uri()
    lrn = learner(untrained_pocket_weights, url, tmp_path / "ckpt")
    store = replay.open_store(url)
    planted = {}
    for i, kind in enumerate(KINDS):
        store.push(good(i))
        group, reason = poison(kind)
        planted[group.group_id] = reason
        store.push(group)
    stats = lrn.train_on_policy(len(KINDS) * 2, timeout_s=30)
    assert stats.groups == len(KINDS) and stats.nonfinite_steps == 0 and math.isfinite(stats.loss)
    expected = {}
    for reason in planted.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.quarantined == expected
    letters = {letter["gid"]: letter["reason"] for letter in store.dead_letters()}
    assert {gid: reason.split(":")[0] for gid, reason in letters.items()} == planted
    assert "1 NaN or infinite values marked valid" in letters["poison-nan_reward"]
    assert "outside the pocket vocabulary" in letters["poison-unencodable_prompt"]
    assert all(bool(torch.isfinite(t).all()) for t in adapter(lrn).values())
    lrn.save_checkpoint()
    after = store.stats()
    assert (after.quarantined, after.acked, after.queue_length, after.corrupt) == (len(KINDS), len(KINDS), 0, 0)
    assert not any(store.is_applied(gid) for gid in planted)
    assert all(store.is_applied(f"good-{i}") for i in range(len(KINDS)))


def test_a_poisoned_reference_group_is_quarantined_not_sampled(untrained_pocket_weights, tmp_path):
    url = (tmp_path / "store").as_uri()
    lrn = learner(untrained_pocket_weights, url, tmp_path / "ckpt", "algorithm.mode=semi_on_policy")
    store = replay.open_store(url)
    bad, _ = poison("nan_pivot_x0")
    for group in (good(0), bad, good(1)):
        store.buffer_add(group)
    seen = []
    original = lrn.train_groups
    lrn.train_groups = lambda groups: seen.append([g.group_id for g in groups]) or original(groups)
    for _ in range(3):
        stats = lrn.train_from_buffer(4)
        assert stats.groups == 4 and math.isfinite(stats.loss)
    assert all(gid.startswith("good-") for batch in seen for gid in batch)
    assert store.buffer_size() == 2 and store.stats().quarantined == 1
    assert store.dead_letters()[0]["gid"] == bad.group_id and "pivot_x0 holds 64 NaN" in store.dead_letters()[0]["reason"]


@pytest.mark.parametrize("objective", ["copo", "sde_grpo", "nft"])
def test_a_nonfinite_step_is_skipped_and_too_many_in_a_row_stop_the_run(untrained_pocket_weights, tmp_path, objective):
    overrides = {"copo": [], "sde_grpo": ["algorithm.objective=sde_grpo"],
                 "nft": ["algorithm.nft_window_chunks=1", "algorithm.nft_micro_batch=4"]}[objective]
    config_file = CONFIG_DIR / "pocket_nft.yaml" if objective == "nft" else None
    lrn = learner(untrained_pocket_weights, (tmp_path / "store").as_uri(), tmp_path / "ckpt", *overrides,
                  config_file=config_file)
    extra = {"exploration": "renoise"} if objective == "sde_grpo" else {}
    with_final = objective == "nft"
    ok = good(0, with_final=with_final).model_copy(update=extra)
    # Finite but huge: passes the door, then the loss overflows (the update's own problem).
    huge = ok.model_copy(update={"group_id": "huge", "pivot_x0": ok.pivot_x0 * 1e30, "pivot_inputs": ok.pivot_inputs * 1e30,
                                 **({"final_latents": ok.final_latents * 1e30} if with_final else {})})
    before = adapter(lrn)
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in lrn.optimizer.state.items()}
    stats = lrn.train_groups([huge])
    assert stats.groups == 1 and lrn.nonfinite_steps == 1 and not math.isfinite(stats.loss)
    assert same(adapter(lrn), before)  # no step: the adapter and the optimiser state are unchanged
    assert {id(p): s for p, s in lrn.optimizer.state.items()} == moments
    assert lrn._finish_iteration(stats, 0.0).nonfinite_steps == 1
    stats = lrn.train_groups([ok])  # a good step resets the count
    assert math.isfinite(stats.loss) and not same(adapter(lrn), before) and lrn.guard.in_row == 0
    lrn.train_groups([huge])
    stepped = adapter(lrn)
    with pytest.raises(NonFiniteUpdateError, match=r"2 optimiser steps in a row .*groups huge.*max_nonfinite_steps=2"):
        lrn.train_groups([huge])
    assert same(adapter(lrn), stepped)


def test_update_metrics_count_quarantined_groups_and_skipped_steps_and_keep_nan():
    metrics = ProjectMetrics(enabled=False)
    metrics.record_update(UpdateStats(groups=4, groups_without_signal=1, loss=math.nan, grad_norm=0.0, group_reward_means={},
                                      policy_version=1, update_s=0.0, quarantined={"reward": 2, "prompt": 1}, nonfinite_steps=1))
    assert metrics.value("groups_quarantined_total", reason="reward") == 2
    assert metrics.value("groups_quarantined_total", reason="prompt") == 1
    assert metrics.value("nonfinite_steps_total") == 1 and metrics.value("groups_applied_total") == 3
    metrics.record_iteration(iteration=0, policy_version=1, loss=math.nan, clip_fraction=0.1, reward_mean={"combined": math.nan})
    assert math.isnan(metrics.value("loss")) and math.isnan(metrics.value("reward_mean", head="combined"))


def test_a_store_whose_applied_set_was_lost_is_refused_at_restore(untrained_pocket_weights, tmp_path, redis_prefix):
    url = f"redis://127.0.0.1:6379/0?prefix={redis_prefix}"
    first = learner(untrained_pocket_weights, url, tmp_path / "ckpt")
    store = replay.open_store(url)
    for checkpoint in range(2):
        for i in range(2):
            # made by the learner's current adapter, as in a sequential run (algorithm.max_policy_lag 0)
            store.push(good(2 * checkpoint + i).model_copy(update={"policy_version": first.version}))
        first.train_on_policy(2, timeout_s=30)
        first.save_checkpoint()
    assert all(store.is_applied(f"good-{i}") for i in range(4))
    client = redis.Redis(port=6379)
    applied = client.smembers(redis_prefix + "applied")
    client.delete(redis_prefix + "applied")  # the applied set alone is lost
    second = learner(untrained_pocket_weights, url, tmp_path / "ckpt")
    with pytest.raises(replay.StoreLostError, match=r"iter_000001 applied 2 groups, but the replay store .* lists none"):
        second.restore_latest()
    client.sadd(redis_prefix + "applied", *applied)  # with its applied set the store is this run's again
    assert second.restore_latest().iteration == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_door_counts_nonfinite_values_exactly_even_when_finite_values_overflow_their_sum(dtype):
    from learner.group_validation import _count_nonfinite

    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum()) and _count_nonfinite(big) == 0  # finite values, an overflowing sum
    big[[3, 500]] = torch.tensor([math.nan, -math.inf], dtype=dtype)
    assert _count_nonfinite(big) == 2
    assert _count_nonfinite(torch.randn(10_000).to(dtype)) == 0
