"""diffusers' Wan block norms, made to keep no float32 copy of a low-precision activation for the backward.

diffusers' ``WanTransformerBlock.forward`` normalises as ``self.norm1(hidden_states.float())`` (and
``norm2``, ``norm3`` alike): the upcast happens in the block, before the norm, so ``layer_norm`` saves
that float32 copy of a whole activation for its backward (about a third of a bf16 replay's saved bytes).
The block's forward offers no seam between the upcast and the norm, so the norm modules themselves
(diffusers' ``FP32LayerNorm``, same parameters and state-dict keys) get a forward that casts the upcast
input back to the block's dtype (exact: it was upcast from it) and applies ``upcast_apply``: the upcast
and the norm are recomputed in the backward and only the low-precision tensor is kept. Values and
gradients are bit-identical to diffusers' path; float32 blocks and no-grad calls take diffusers' path.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import FP32LayerNorm

from policy.attention import upcast_apply

_BLOCK_NORMS = ("norm1", "norm2", "norm3")


class RecomputedUpcastLayerNorm(FP32LayerNorm):
    """``FP32LayerNorm`` whose float32 input, an upcast of ``upcast_from``, is recomputed, not saved."""

    upcast_from: torch.dtype | None = None  # the block's dtype, recorded by its forward pre-hook

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        source = self.upcast_from
        if source in (None, inputs.dtype) or not (torch.is_grad_enabled() and inputs.requires_grad):
            return super().forward(inputs)
        return upcast_apply(super().forward, inputs.to(source))


def _record_block_dtype(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    hidden_states = args[0] if args else kwargs["hidden_states"]
    for name in _BLOCK_NORMS:
        norm = getattr(block, name)
        if isinstance(norm, RecomputedUpcastLayerNorm):
            norm.upcast_from = hidden_states.dtype


def recompute_block_norm_upcasts(block: torch.nn.Module) -> None:
    """Give ``block``'s float32 norms the recomputed upcast (in place: same modules, same parameters).

    The block's forward pre-hook records the dtype of its ``hidden_states``, the dtype every norm input
    of diffusers' block was upcast from (its residual stream is cast back with ``type_as`` after each
    step); it runs again when activation checkpointing recomputes the block."""
    for name in _BLOCK_NORMS:
        norm = getattr(block, name)
        if type(norm) is FP32LayerNorm:
            norm.__class__ = RecomputedUpcastLayerNorm
    block.register_forward_pre_hook(_record_block_dtype, with_kwargs=True)
