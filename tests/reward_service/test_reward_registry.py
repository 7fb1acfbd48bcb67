"""The reward registry: lazy plugin discovery, module-qualified names, clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from reward_service.base import RewardModel, Video
from reward_service.registry import build_reward, declared_heads, register_reward, resolve_factory


def test_known_rewards_resolve_without_importing_heavy_libraries():
    code = (
        "import sys, reward_service.registry as r\n"
        "r.resolve_factory('videoalign')\n"
        "heavy = [m for m in ('transformers', 'torch', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_module_qualified_name_builds_a_working_reward():
    model = build_reward("toy_rewards:toy_brightness")
    frames = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    frames[..., 1] = 51
    scores = model.score([Video(frames, 8.0)], ["p"])
    assert scores["G"].tolist() == [0.2] and scores["R"].tolist() == [0.0]


def test_unknown_names_and_modules_are_reported():
    with pytest.raises(KeyError, match=r"unknown reward 'nope'; registered: \[.*'videoalign'"):
        resolve_factory("nope")
    with pytest.raises(KeyError, match="cannot import module 'no_such_module'"):
        resolve_factory("no_such_module:x")
    with pytest.raises(KeyError, match="does not register 'x'"):
        resolve_factory("toy_rewards:x")


def test_a_name_cannot_be_taken_twice_and_factories_are_checked():
    class Plain(RewardModel):
        name, heads = "plain", ("a",)

        def score(self, videos, prompts):
            return {"a": np.zeros(len(videos))}

    register_reward("test_registry_plain")(Plain)
    register_reward("test_registry_plain")(Plain)  # the same factory again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_registry_plain")(lambda: Plain())
    register_reward("test_registry_not_a_reward")(lambda: object())
    with pytest.raises(TypeError, match="returned object, not a RewardModel"):
        build_reward("test_registry_not_a_reward")
    with pytest.raises(TypeError, match=r"'test_registry_plain' rejected its config \(keys \['size'\]\)"):
        build_reward("test_registry_plain", size=3)


def test_declared_heads_are_known_without_building_and_must_match_the_model():
    class Configured(RewardModel):
        name = "configured"

        def __init__(self, heads=("a", "b")):
            self.heads = tuple(heads)

        def score(self, videos, prompts):
            return {h: np.zeros(len(videos)) for h in self.heads}

    built = []
    register_reward("test_registry_declared", heads=lambda heads=("a", "b"): tuple(heads))(
        lambda **config: built.append(config) or Configured(**config))
    assert declared_heads("test_registry_declared") == ("a", "b")
    assert declared_heads("test_registry_declared", heads=["x"]) == ("x",)
    assert built == []  # declaring heads builds nothing
    assert build_reward("test_registry_declared", heads=["x"]).heads == ("x",)
    register_reward("test_registry_lying", heads=("a", "z"))(Configured)
    with pytest.raises(ValueError, match=r"registered with heads \('a', 'z'\) but the model has \('a', 'b'\)"):
        build_reward("test_registry_lying")
    register_reward("test_registry_undeclared")(Configured)
    assert declared_heads("test_registry_undeclared") is None
    assert declared_heads("pocket") == build_reward("pocket").heads == ("VQ", "MQ", "TA")
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        declared_heads("nope")
