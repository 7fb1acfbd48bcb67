"""The generator: block-causal Wan with a KV cache, few-step sampler, noise plans, forked rollouts.

Main entry points (imported lazily, so ``import policy`` stays cheap):
``StreamingVideoPolicy``, ``rollout_group``, ``replay_pivot_chunk``, ``NoisePlan``, ``build_policy``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CausalWanTransformer3DModel": "policy.transformer_causal_wan",
    "KVCache": "policy.kv_cache",
    "block_causal_mask": "policy.attention",
    "teacher_forcing_mask": "policy.attention",
    "SamplerConfig": "policy.sampler",
    "NoisePlan": "policy.noise_plan",
    "GroupNoisePlan": "policy.noise_plan",
    "StreamingVideoPolicy": "policy.pipeline",
    "TextEncoder": "policy.pipeline",
    "VideoCodec": "policy.pipeline",
    "prompt_key": "policy.pipeline",
    "generate": "policy.rollout",
    "rollout_group": "policy.rollout",
    "GroupRollout": "policy.rollout",
    "replay_pivot_chunk": "policy.pivot_replay",
    "rebuild_prefix_cache": "policy.pivot_replay",
    "PolicyPreset": "policy.presets",
    "get_preset": "policy.presets",
    "build_policy": "policy.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'policy' has no attribute {name!r}")
