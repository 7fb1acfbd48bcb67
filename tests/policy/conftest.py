"""Tiny policies for the policy tests: random tiny transformer, a deterministic toy text encoder."""

from __future__ import annotations

import hashlib

import pytest
import torch

from policy.presets import build_policy, get_preset


@pytest.fixture(autouse=True)
def _single_thread(single_torch_thread):
    """Every policy test runs on one intra-op thread (tests/conftest.py)."""


class ToyTextEncoder:
    """Deterministic stand-in for umT5: each word hashes to a seeded vector, zero past the prompt."""

    encoder_id = "toy-text-encoder-v1"

    def __init__(self, dim: int = 32, seq_len: int = 8) -> None:
        self.dim, self.seq_len = dim, seq_len
        self.calls = 0

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(prompts), self.seq_len, self.dim)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[: self.seq_len]):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
                out[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
        return out


def make_policy(name: str = "tiny", seed: int = 0, **overrides):
    preset = get_preset(name)
    if overrides:
        preset = preset.model_copy(update=overrides)
    return build_policy(preset, text_encoder=ToyTextEncoder(dim=preset.transformer["text_dim"]), seed=seed)


@pytest.fixture
def tiny_policy():
    return make_policy("tiny")


@pytest.fixture
def text_cond(tiny_policy):
    return tiny_policy.text_conditioning(["a red ball rolls left"])
