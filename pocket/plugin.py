"""The pocket world's registrations, called once per process through the `arcopo.plugins` entry point.

Light on purpose: the preset, the verifiers and the FVD metric import torch, so only their modules are
named here and imported when a run first asks for them.
"""

from __future__ import annotations

from policy.plugins import register_ood_metric, register_preset_module, register_prompt_set


def register() -> None:
    from pocket import domain, reward  # noqa: F401  (`reward` registers the reward model "pocket")

    register_preset_module("pocket", "pocket.preset")
    register_prompt_set("pocket:train", domain.train_prompts)
    register_prompt_set("pocket:heldout", domain.heldout_prompts)
    register_ood_metric("pocket_fvd", "pocket.ood_metric:pocket_fvd", column="fvd_p")
