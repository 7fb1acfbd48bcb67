"""The pocket world: a synthetic video domain, its verifier rewards and out-of-domain metric, and a
tiny block-causal Wan generator trained on it (shipped weights), so the whole system runs on a CPU.

A plug-in: production code never imports it. ``plugin.register`` (the ``arcopo.plugins`` entry point)
registers the ``pocket`` preset, the ``pocket`` reward model, the ``pocket:train`` / ``pocket:heldout``
prompt sets and the ``pocket_fvd`` out-of-domain metric.

Modules: ``domain`` (videos and prompts), ``verifiers`` (TA/VQ/MQ) and ``reward`` (their reward model),
``ood_metric`` (Frechet distance to real videos), ``codec`` and ``text_encoder`` (the generator's latent
space and conditioning), ``preset`` (``load_pocket_policy``), ``train`` / ``sample`` / ``evaluate``
(commands). The studies on it live with the experiments (``experiments.pocket_studies``).
Importing this package imports neither torch nor diffusers; ``load_pocket_policy`` does.
"""

from __future__ import annotations


def load_pocket_policy(*args, **kwargs):
    """The trained pocket generator as a ``StreamingVideoPolicy``; see ``pocket.preset``."""
    from pocket.preset import load_pocket_policy as load

    return load(*args, **kwargs)


__all__ = ["load_pocket_policy"]
