"""Plug-ins reach production code only through the `arcopo.plugins` entry point.

The pocket world is the installed plug-in: its registrations are checked against its own modules, and a
fresh interpreter shows that importing the production packages imports no part of it.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from policy import plugins, presets
from reward_service.registry import build_reward

ROOT = Path(__file__).resolve().parents[2]


def test_the_pocket_plugin_registers_its_preset_reward_prompt_sets_and_metric():
    from pocket import domain
    from pocket.ood_metric import pocket_fvd
    from pocket.reward import PocketVerifierReward

    assert plugins.load_plugins().get("pocket", "missing") is None
    preset = presets.get_preset("pocket")
    assert (preset.fps, preset.ood_metric) == (domain.FPS, "pocket_fvd")
    assert presets.preset_loader("pocket") is not None and presets.preset_loader("tiny") is None
    assert isinstance(build_reward("pocket"), PocketVerifierReward)
    assert plugins.prompt_set("pocket:train") == list(domain.train_prompts())
    assert plugins.prompt_set("pocket:heldout") == list(domain.heldout_prompts())
    assert plugins.prompt_set("no-such-set") is None
    assert plugins.get_ood_metric("pocket_fvd") is pocket_fvd


def test_a_preset_loader_loads_the_shipped_weights_when_no_directory_is_given():
    from pocket.preset import load_pocket_policy

    loaded = presets.preset_loader("pocket")(None)
    shipped = load_pocket_policy()
    for (name, a), (_, b) in zip(loaded.transformer.state_dict().items(), shipped.transformer.state_dict().items()):
        assert a.equal(b), name
    assert loaded.sampler == shipped.sampler


def test_production_packages_import_no_plugin_until_a_registry_asks():
    code = (
        "import sys\n"
        "import controller.driver, controller.merge, controller.evaluation, policy.factory, "
        "rollout_workers.worker, reward_service.registry, policy.presets\n"
        "assert not [m for m in sys.modules if m == 'pocket' or m.startswith('pocket.')], 'pocket imported'\n"
        "policy.presets.get_preset('pocket')\n"
        "assert 'pocket.preset' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_broken_plugin_is_named_in_unknown_name_errors_and_does_not_stop_the_others(monkeypatch):
    broken = EntryPoint("broken", "no_such_module_for_plugins:register", plugins.ENTRY_POINT_GROUP)
    real = list(plugins.entry_points(group=plugins.ENTRY_POINT_GROUP))
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real, broken])
    monkeypatch.setattr(plugins, "_LOADED", {})
    loaded = plugins.load_plugins()
    assert loaded["pocket"] is None and "ModuleNotFoundError" in loaded["broken"]
    with pytest.raises(KeyError, match="broken failed: no_such_module_for_plugins:register"):
        presets.get_preset("no-such-preset")
    with pytest.raises(ValueError, match="unknown out-of-domain metric 'nope'.*pocket_fvd"):
        plugins.get_ood_metric("nope")


def test_an_unknown_set_of_a_plugins_namespace_is_an_error_naming_the_known_sets(tmp_path):
    from controller.task_sampler import load_prompts

    with pytest.raises(ValueError, match=r"unknown prompt set 'pocket:nope'.*pocket:heldout"):
        load_prompts("pocket:nope")
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na cat\n\na dog\n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]
