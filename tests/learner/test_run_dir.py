"""The driver's start-up checks, before any actor starts: output directories of earlier runs, resumes
from damaged checkpoints, the reward model and heads, and what the run writes (config records, secrets).

`System.start` is replaced by a sentinel that records what was on disk when the run would have
started its actors; the checks under test all happen before it."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from checkpoint_fixtures import ADAPTER, RANK, flip_tensor_byte, write_checkpoint
from controller import driver
from controller.config import ConfigError, dump_config, load_config
from controller.run_dir import ResumeError, find_resume_point

SMALL = [f"lora.rank={RANK}", "run.iterations=1"]


class ActorsWouldStart(Exception):
    pass


@pytest.fixture
def no_actors(monkeypatch):
    """Make reaching `System.start` an observable event instead of a Ray cluster."""
    seen = []

    def start(config, output, **options):
        seen.append(_snapshot(output))
        raise ActorsWouldStart(str(output))

    monkeypatch.setattr(driver.System, "start", start)
    return seen


def _snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _earlier_run_without_checkpoint(out):
    """What a run that stopped before its first checkpoint leaves: its config, a metrics row, its replay store."""
    out.mkdir(parents=True)
    (out / "config.yaml").write_text("run: {iterations: 1}\n")
    (out / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "reward_mean": 0.5, "policy_version": 1}) + "\n")
    (out / "replay").mkdir()
    (out / "replay" / "state.json").write_text('{"applied": ["run-it000000-0000"]}')


def test_a_new_run_refuses_a_directory_with_an_earlier_run_that_has_no_checkpoint(tmp_path, no_actors):
    out = tmp_path / "run"
    _earlier_run_without_checkpoint(out)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"earlier run's files \(metrics\.jsonl, replay, config\.yaml\).*--resume"):
        driver.train(load_config(None, SMALL), out)
    with pytest.raises(ResumeError, match="nothing to resume .*stopped before its first checkpoint"):
        driver.train(load_config(None, SMALL), out, resume=True)
    assert _snapshot(out) == before and no_actors == []
    assert driver.main(["--output", str(out), *SMALL]) == 2
    only_epoch = tmp_path / "epoch_only"  # the store identity a started run records is an earlier run's too
    only_epoch.mkdir()
    (only_epoch / "replay_epoch.json").write_text('{"epoch": "abc@2026-01-01T00:00:00Z"}')
    with pytest.raises(FileExistsError, match=r"\(replay_epoch\.json\)"):
        driver.train(load_config(None, SMALL), only_epoch)


def test_a_new_run_may_use_an_empty_or_new_directory(tmp_path, no_actors):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "run"):
        with pytest.raises(ActorsWouldStart):
            driver.train(load_config(None, SMALL), out)
        assert (out / "config.yaml").is_file()


def _run_with_checkpoints(out, damaged_latest: bool):
    _earlier_run_without_checkpoint(out)
    (out / "config.yaml").write_text(dump_config(load_config(None, SMALL)))
    original = (out / "config.yaml").read_text()
    write_checkpoint(out / "checkpoints", 1)
    latest, _ = write_checkpoint(out / "checkpoints", 2, seed=1)
    if damaged_latest:
        flip_tensor_byte(latest / "adapter" / "adapter_model.safetensors")
    return original


def test_resume_from_a_damaged_checkpoint_writes_nothing_and_names_the_newest_intact_one(tmp_path, no_actors):
    out = tmp_path / "run"
    _run_with_checkpoints(out, damaged_latest=True)
    before = _snapshot(out)
    with pytest.raises(ResumeError) as err:
        driver.train(load_config(None, SMALL + ["algorithm.learning_rate=3e-4"]), out, resume=True)
    message = str(err.value)
    assert "iter_000002 is damaged: adapter/adapter_model.safetensors does not match its SHA-256" in message
    assert "newest intact checkpoint before it is iter_000001 (iteration 1, policy version 1)" in message
    assert "--resume --resume-from iter_000001" in message
    assert _snapshot(out) == before and no_actors == []  # config.yaml kept, nothing written


def test_resume_without_a_latest_pointer_offers_the_newest_intact_checkpoint(tmp_path, no_actors):
    out = tmp_path / "run"
    _run_with_checkpoints(out, damaged_latest=True)
    (out / "checkpoints" / "latest").unlink()
    with pytest.raises(ResumeError, match=r"missing .*latest\)\nThe newest intact checkpoint is iter_000001 .*--resume-from iter_000001"):
        driver.train(load_config(None, SMALL), out, resume=True)
    assert no_actors == []


def test_resume_from_the_intact_checkpoint_sets_the_newer_aside_and_keeps_the_first_config(tmp_path, no_actors, caplog):
    out = tmp_path / "run"
    original = _run_with_checkpoints(out, damaged_latest=True)
    config = load_config(None, SMALL + ["algorithm.learning_rate=3e-4"])
    point = find_resume_point(out, config, "iter_000001")
    assert point.state.iteration == 1 and [p.name for p in point.set_aside] == ["iter_000002"]
    assert point.run_tag.startswith("run-") and point.run_tag != "run"  # iteration 1's group ids were applied once
    with caplog.at_level(logging.WARNING), pytest.raises(ActorsWouldStart):
        driver.train(config, out, resume_from="iter_000001")
    on_disk = no_actors[0]
    assert (out / "checkpoints" / "latest").read_text() == "iter_000001"
    assert "checkpoints/set_aside/iter_000002/state.json" in on_disk and "checkpoints/iter_000002/state.json" not in on_disk
    assert (out / "config.yaml").read_text() == original
    assert "learning_rate: 0.0003" in (out / "config.resume-1.yaml").read_text()
    assert "differs from" in caplog.text and "in algorithm.learning_rate (0.0001 -> 0.0003) (recorded in config.resume-1.yaml)" in caplog.text
    # a plain --resume now continues from iter_000001, and records its config as the second resume
    with pytest.raises(ActorsWouldStart):
        driver.train(config, out, resume=True)
    assert (out / "config.resume-2.yaml").is_file() and (out / "config.yaml").read_text() == original


def test_resume_refuses_a_checkpoint_of_another_rank_before_writing(tmp_path, no_actors):
    out = tmp_path / "run"
    _run_with_checkpoints(out, damaged_latest=False)
    before = _snapshot(out)
    with pytest.raises(ResumeError, match=f"rank {RANK}, this run's lora.rank is 8"):
        driver.train(load_config(None, ["lora.rank=8", "run.iterations=1"]), out, resume=True)
    with pytest.raises(ResumeError, match=f"holds adapter '{ADAPTER}', this run trains 'semi_on_policy'"):
        driver.train(load_config(None, SMALL + ["algorithm.mode=semi_on_policy"]), out, resume=True)
    assert _snapshot(out) == before and no_actors == []


def test_reward_heads_model_and_preset_are_checked_before_anything_starts(tmp_path, no_actors):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"reward\.weights: 'XQ' is not a head of reward model 'pocket'"):
        driver.train(load_config(None, SMALL + ["reward.weights={VQ: 1.0, XQ: 1.0}"]), out)
    with pytest.raises(ConfigError, match=r"reward\.model: unknown reward 'pocket_v2'"):
        driver.train(load_config(None, SMALL + ["reward.model=pocket_v2"]), out)
    with pytest.raises(ConfigError, match=r"policy\.preset: unknown policy preset 'pocket2'; known: .*'pocket'"):
        driver.train(load_config(None, SMALL + ["policy.preset=pocket2"]), out)
    assert not out.exists() and no_actors == []
    assert driver.main(["--output", str(out), *SMALL, "reward.model=pocket_v2"]) == 2


def test_a_password_in_the_replay_url_is_not_written(tmp_path, no_actors):
    out = tmp_path / "run"
    with pytest.raises(ActorsWouldStart):
        driver.train(load_config(None, SMALL + ["replay.url='redis://:hunter2@127.0.0.1:6379/0?prefix=x'"]), out)
    assert all(b"hunter2" not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert "redis://:***@127.0.0.1:6379/0?prefix=x" in (out / "config.yaml").read_text()
