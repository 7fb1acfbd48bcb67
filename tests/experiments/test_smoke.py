"""One tiny table end to end through the real driver: Figure 2 (AR-CoPO and SDE-GRPO, one seed, one
iteration each) on untrained pocket weights, on a local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from experiments.budget import Budget
from experiments.fig2 import method_config
from experiments.report import read_sections
from experiments.run import run_experiment
from experiments.training import train_run
from learner.evaluation import evaluate_policy
from learner.task_sampler import eval_set, load_prompts
from policy.pocket.preset import load_pocket_policy
from reward_service.registry import build_reward

TINY = Budget("tiny", iterations=1, groups_per_iteration=1, group_size=2, anchors_per_group=1, buffer_groups=1,
              eval_prompts=3, seeds=1, entropy_seeds=1, num_workers=1)


@pytest.fixture
def ray_after():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_fig2_tiny_runs_both_objectives_through_the_driver(tmp_path, untrained_pocket_weights, ray_after):
    out, work = tmp_path / "results", tmp_path / "runs"
    section = run_experiment("fig2", TINY, [0], out, work, untrained_pocket_weights, fresh=False)

    body = read_sections((out / "experiments.md").read_text())["fig2"]
    assert "Budget `tiny`: 1 iterations x 1 groups/iteration x G = 2" in body and "Wall time of this command" in body
    assert (out / "fig2_reward_curves.png").stat().st_size > 5000
    runs = section.data["runs"]
    for method, objective in (("AR-CoPO", "copo"), ("SDE-GRPO", "sde_grpo")):
        (directory,) = runs[method]
        assert f"objective: {objective}" in (Path(directory) / "config.yaml").read_text()
        rows = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [0] and rows[0]["groups"] == 1

    # The base row is the library's own held-out evaluation (FVD-p through pocket_fvd, not the runner's cache).
    prompts, seeds = eval_set(load_prompts("pocket:heldout"), 1, 3, 0)
    direct = evaluate_policy(load_pocket_policy(untrained_pocket_weights), prompts, seeds, [build_reward("pocket")],
                             {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}, ood="pocket_fvd")
    base = section.data["base"]
    assert base["Overall"] == pytest.approx(direct.reward, rel=1e-5)
    assert base["FVD"] == pytest.approx(direct.ood, rel=1e-5)
    assert {h: base[h] for h in ("TA", "VQ", "MQ")} == pytest.approx(direct.rewards, rel=1e-5)

    # A finished run with the same configuration is reused, not trained again.
    config = method_config("copo", TINY, 0, [f"policy.transformer_checkpoint={untrained_pocket_weights}"])
    again = train_run("copo", config, work)
    assert again.reused and str(again.directory) == runs["AR-CoPO"][0] and len(again.rows) == 1
