"""The pocket world: a synthetic video domain, its verifier rewards and out-of-domain metric, and a
tiny block-causal Wan generator trained on it (shipped weights), so the whole system runs on a CPU.

Modules: ``domain`` (videos and prompts), ``verifiers`` (TA/VQ/MQ), ``ood_metric`` (Frechet distance
to real videos), ``codec`` and ``text_encoder`` (the generator's latent space and conditioning),
``preset`` (``load_pocket_policy``), ``train`` / ``sample`` / ``entropy`` / ``fork_spread`` / ``evaluate``
(commands).
Importing this package imports neither torch nor diffusers; ``load_pocket_policy`` does.
"""

from __future__ import annotations


def load_pocket_policy(*args, **kwargs):
    """The trained pocket generator as a ``StreamingVideoPolicy``; see ``policy.pocket.preset``."""
    from policy.pocket.preset import load_pocket_policy as load

    return load(*args, **kwargs)


__all__ = ["load_pocket_policy"]
