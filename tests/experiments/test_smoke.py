"""One run end to end through the real driver on a local Ray cluster: Figure 2's SDE-GRPO run (the
driver path no other test takes) at one iteration of one group of two, on untrained pocket weights.
It checks what the tables read from a run: the metrics keys, the adapter the checkpoint leaves, and
that a finished run is reused rather than trained again."""

from __future__ import annotations

import json

import pytest
import ray

from experiments.budget import Budget
from experiments.fig2 import method_config
from experiments.heldout import HeldOut
from experiments.training import FINISHED, train_run
from controller.evaluation import evaluate_policy
from pocket.preset import load_pocket_policy
from reward_service.registry import build_reward

TINY = Budget("tiny", iterations=1, groups_per_iteration=1, group_size=2, anchors_per_group=1, buffer_groups=1,
              eval_prompts=2, seeds=1, entropy_seeds=1, num_workers=1)
KEYS_READ = ("iteration", "reward_mean", "reward_VQ", "groups", "groups_without_signal", "seconds", "update_s")


@pytest.fixture
def ray_after():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_sde_grpo_run_through_the_driver_feeds_the_tables(tmp_path, untrained_pocket_weights, ray_after):
    config = method_config("sde_grpo", TINY, 0, [f"policy.transformer_checkpoint={untrained_pocket_weights}"])
    run = train_run("sde_grpo", config, tmp_path)
    assert not run.reused and (run.directory / FINISHED).is_file()
    assert "objective: sde_grpo" in (run.directory / "config.yaml").read_text()
    assert [r["iteration"] for r in run.rows] == [0]
    row = run.rows[0]
    assert all(k in row for k in KEYS_READ), [k for k in KEYS_READ if k not in row]
    assert row["groups"] == 1 and row["policy_version"] == 1

    # The checkpoint's adapter loads into the held-out evaluation and changes the policy.
    held = HeldOut(config, TINY.eval_prompts)
    trained, base = held.adapter(run.adapter_dir), held.base()
    assert json.loads((run.adapter_dir / "adapter_config.json").read_text())["r"] == config.lora.rank
    assert trained.fvd != pytest.approx(base.fvd, abs=1e-12)

    # The base row is the library's own evaluation (FVD-p through pocket_fvd, not the cached reference).
    direct = evaluate_policy(load_pocket_policy(untrained_pocket_weights), held.prompts, held.seeds, [build_reward("pocket")],
                             {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}, ood="pocket_fvd")
    assert base.overall == pytest.approx(direct.reward, rel=1e-6)
    assert base.heads == pytest.approx(direct.rewards, rel=1e-6)
    assert base.fvd == pytest.approx(direct.ood, rel=1e-6)

    again = train_run("sde_grpo", config, tmp_path)
    assert again.reused and again.directory == run.directory and again.rows == run.rows
    assert train_run("sde_grpo", config, tmp_path, fresh=True).reused  # finished by this process: kept under --fresh
