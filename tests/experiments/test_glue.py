"""The tables' glue without Ray: which runs each experiment asks the driver for (configs, seeds, shared
runs, the off-policy buffer) and which adapter each row of a table evaluates.

Training is replaced by a recorder that returns metrics rows and a real PEFT adapter (random LoRA B)
saved as a learner checkpoint. The merge sweep evaluates those adapters for real on untrained pocket
weights; the other tables get a stand-in evaluation that names the adapter it was given. The driver
itself is covered by test_smoke.py and tests/learner/test_end_to_end.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments import fig2, nft, table2, table3
from experiments.budget import Budget
from experiments.heldout import HeldOut
from experiments.tables import Scores
from experiments.training import RunResult
from learner.checkpoint import save_learner_checkpoint
from policy.lora import attach_adapter
from pocket.preset import new_transformer

TINY = Budget("tiny", iterations=2, groups_per_iteration=1, group_size=2, anchors_per_group=1, buffer_groups=1,
              eval_prompts=2, seeds=2, entropy_seeds=1, num_workers=1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two trained-looking adapters (random LoRA B) saved as learner checkpoints, as the driver leaves them."""
    roots = []
    for k in range(2):
        torch.manual_seed(k)
        transformer = attach_adapter(new_transformer(0), "trained", rank=4, alpha=8)
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        root = tmp_path_factory.mktemp(f"run{k}")
        save_learner_checkpoint(root / "checkpoints", 2, transformer, "trained", torch.optim.SGD([torch.zeros(1)], lr=1.0), {})
        roots.append(root)
    return roots


class Recorder:
    """Stands in for `train_run`: records each requested run, returns rows and one of the saved adapters."""

    def __init__(self, adapters):
        self.adapters, self.calls = adapters, []

    def __call__(self, label, config, work, fresh=False):
        self.calls.append((label, config))
        rows = [{"iteration": i, "reward_mean": 1.0 + i, "reward_VQ": 0.3, "groups": 1, "groups_without_signal": 0,
                 "seconds": 2.0, "update_s": 1.0} for i in range(config.run.iterations)]
        return RunResult(label, config.run.seed, self.adapters[len(self.calls) % 2], rows, wall_s=5.0, reused=False)


class LabelledHeldOut:
    """Stands in for `HeldOut`: the base scores 1.0; an adapter of run k scores 10 + k (runs named run0, run1)."""

    def __init__(self, config, prompts_limit):
        self.config = config

    def base(self) -> Scores:
        return Scores({"TA": 0.2, "VQ": 0.4, "MQ": 0.4}, 1.0, 5.0)

    def adapter(self, directory) -> Scores:
        k = int(Path(directory).parents[2].name.removeprefix("run")[0])
        return Scores({"TA": 10.0 + k, "VQ": 0.0, "MQ": 0.0}, 10.0 + k, 5.0 + k)


def _patch(monkeypatch, module, adapters, evaluate: bool = False) -> Recorder:
    recorder = Recorder(adapters)
    monkeypatch.setattr(module, "train_run", recorder)
    if not evaluate:
        monkeypatch.setattr(module, "HeldOut", LabelledHeldOut)
    return recorder


def _budget_fields(config):
    return (config.run.iterations, config.algorithm.groups_per_iteration, config.algorithm.group_size,
            config.algorithm.learning_rate, config.lora.rank, config.run.seed)


def test_fig2_asks_for_both_objectives_on_one_budget_and_evaluates_their_adapters(monkeypatch, tmp_path, adapters,
                                                                                   untrained_pocket_weights):
    recorder = _patch(monkeypatch, fig2, adapters)
    extra = [f"policy.transformer_checkpoint={untrained_pocket_weights}"]
    section = fig2.run(TINY, [0, 1], tmp_path, tmp_path / "runs", extra, fresh=False)
    by_objective = {}
    for label, config in recorder.calls:
        assert config.algorithm.mode == "on_policy" and config.reward.weights == {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}
        by_objective.setdefault(config.algorithm.objective, []).append(_budget_fields(config))
    assert by_objective["copo"] == by_objective["sde_grpo"] == [(2, 1, 2, 1e-4, 16, 0), (2, 1, 2, 1e-4, 16, 1)]

    # Each row evaluates its own run's adapter: the recorder hands out run1, run0, run1, run0 in call order.
    assert [r["Overall"] for r in section.data["final"]["AR-CoPO"]] == [11.0, 10.0]
    assert [r["Overall"] for r in section.data["final"]["SDE-GRPO"]] == [11.0, 10.0]
    assert section.data["held_out_change"]["AR-CoPO"]["mean"] == pytest.approx(9.5)  # base 1.0


def test_table2_optimises_ta_only_and_off_policy_reuses_the_semi_buffer(monkeypatch, tmp_path, adapters, untrained_pocket_weights):
    recorder = _patch(monkeypatch, table2, adapters)
    section = table2.run(TINY, [0], tmp_path, tmp_path / "runs", [f"policy.transformer_checkpoint={untrained_pocket_weights}"], False)
    modes = [(c.algorithm.mode, c.algorithm.effective_clip_eps, c.reward.weights) for _, c in recorder.calls]
    assert modes == [("on_policy", 0.2, {"TA": 1.0}), ("semi_on_policy", 0.2, {"TA": 1.0}), ("off_policy", None, {"TA": 1.0})]
    semi_dir = adapters[0]  # the second call (semi) got adapters[0]
    assert recorder.calls[2][1].replay.import_buffer == semi_dir / "reference_buffer"
    assert {m: [r["Overall"] for r in rows] for m, rows in section.data["final"].items()} == {
        "on-policy": [11.0], "semi-on-policy": [10.0], "off-policy": [11.0]}
    assert set(section.data["base"]) >= {"TA", "VQ", "MQ", "Overall", "FVD"}


def test_table3_shares_fig2s_on_policy_run_and_sweeps_the_paper_scales(monkeypatch, tmp_path, adapters, untrained_pocket_weights):
    assert table3.SCALES == (0.0, 0.4, 0.5, 0.6, 0.8, 1.0)  # the paper's (Tables 3-4)
    monkeypatch.setattr(table3, "SCALES", (0.0, 0.5, 1.0))  # three merges evaluated for real are enough here
    recorder = _patch(monkeypatch, table3, adapters, evaluate=True)
    extra = [f"policy.transformer_checkpoint={untrained_pocket_weights}"]
    section = table3.run(TINY, [0], tmp_path, tmp_path / "runs", extra, False)
    (semi_label, semi), (on_label, on) = recorder.calls
    assert semi.algorithm.mode == "semi_on_policy" and semi.reward.weights == {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}
    assert (on_label, on) == ("copo", fig2.method_config("copo", TINY, 0, extra))  # the same run as Figure 2's
    assert list(section.data["sweep"]) == ["1", "0.5", "0"]
    # s = 0 is the semi-on-policy adapter alone: it equals evaluating that adapter by itself.
    held = HeldOut(semi, TINY.eval_prompts)
    alone = held.adapter(adapters[1] / "checkpoints" / "iter_000002" / "adapter")
    assert section.data["sweep"]["0"][0]["Overall"] == pytest.approx(alone.overall)
    assert section.data["sweep"]["1"][0]["FVD"] != pytest.approx(alone.fvd, abs=1e-9)


def test_nft_runs_the_nft_config_on_the_copo_budget(monkeypatch, tmp_path, adapters, untrained_pocket_weights):
    recorder = _patch(monkeypatch, nft, adapters)
    extra = [f"policy.transformer_checkpoint={untrained_pocket_weights}"]
    section = nft.run(TINY, [0], tmp_path, tmp_path / "runs", extra, False)
    (copo_label, copo), (nft_label, nft_config) = recorder.calls
    assert copo == fig2.method_config("copo", TINY, 0, extra)
    assert nft_config.algorithm.objective == "nft" and nft_config.algorithm.nft_selective_reg
    assert _budget_fields(nft_config) == _budget_fields(copo)
    assert {m: [r["Overall"] for r in rows] for m, rows in section.data["final"].items()} == {
        "AR-CoPO": [11.0], "Astrolabe NFT": [10.0]}
