"""VideoReward's rotary positions in the precision the published checkpoint was trained with.

KwaiVGI/VideoAlign pins transformers 4.45 and casts the whole reward model with `.to(bfloat16)`, which
also casts the non-persistent `inv_freq` buffers. In 4.45 that meant:

  text    inv_freq = bf16(1 / theta^(2i/d));  angles = float32(inv_freq) * position (float32),
          cos/sin in float32, then cast to the activations' dtype
  vision  inv_freq = bf16(1 / theta^(2i/d'));  angles = bf16(bf16(position) * inv_freq),
          cos/sin computed in bf16 and only then widened to float32 for the rotation

transformers 5 keeps both buffers and the angle and cos/sin arithmetic in float32. For the text model
(theta 1e6, head dim 128) the bf16-rounded frequencies move the phase by up to 1.2 rad at a token
distance of 1,000 and 2.3 rad at 2,000, and a 480p clip puts the reward tokens 300-1,900 positions
after the video tokens; the checkpoint learned its attention with those phases.

`apply_rotary_precision(model, "bf16_trained")` reproduces 4.45's numbers through the rotary modules
themselves: the text rotary keeps its transformers-5 forward with bf16-rounded `inv_freq` values, and
the vision rotary's forward is replaced by one doing 4.45's bf16 arithmetic (the module's own
`recomposition_frequencies` lays the result out). `"float32"` leaves transformers 5's computation.
"""

from __future__ import annotations

import types

import torch
from torch import nn

ROTARY_PRECISIONS = ("bf16_trained", "float32")


def apply_rotary_precision(model: nn.Module, precision: str) -> int:
    """Set every Qwen2-VL rotary module under `model` to `precision`; returns how many were changed."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding

    if precision not in ROTARY_PRECISIONS:
        raise ValueError(f"rotary_precision must be one of {ROTARY_PRECISIONS}, got {precision!r}")
    changed = 0
    for module in model.modules():
        if isinstance(module, Qwen2VLRotaryEmbedding):
            _set_inv_freq(module, bf16=precision == "bf16_trained")
            changed += 1
        elif isinstance(module, Qwen2VLVisionRotaryEmbedding):
            _set_inv_freq(module, bf16=precision == "bf16_trained")
            if precision == "bf16_trained":
                module.forward = types.MethodType(_vision_forward_bf16, module)
            else:
                module.__dict__.pop("forward", None)  # back to the class's float32 forward
            changed += 1
    if changed == 0:
        raise TypeError(f"{type(model).__name__} holds no Qwen2-VL rotary embedding to set")
    return changed


def _set_inv_freq(module: nn.Module, bf16: bool) -> None:
    """inv_freq from the module's float32 original, rounded through bf16 when `bf16`.

    Stored as float32 holding the rounded values: the transformers-5 text forward widens inv_freq to
    float32 anyway, so with these values it runs 4.45's text arithmetic unchanged."""
    if not hasattr(module, "_float32_inv_freq"):
        if module.original_inv_freq.dtype != torch.float32:
            raise TypeError(f"{type(module).__name__}.inv_freq is {module.original_inv_freq.dtype}: build the model "
                            "with dtype= (which keeps rotary buffers in float32), not .to(dtype)")
        module._float32_inv_freq = module.original_inv_freq.detach().clone()
    fresh = module._float32_inv_freq.to(module.inv_freq.device)
    module.inv_freq = fresh.to(torch.bfloat16).to(torch.float32) if bf16 else fresh.clone()
    module.original_inv_freq = module.inv_freq.clone()


@torch.no_grad()
def _vision_forward_bf16(self, x: torch.Tensor, position_ids: torch.Tensor):
    """4.45's vision rotary after `.to(bfloat16)`: bf16 positions times bf16 frequencies, rounded to bf16,
    cos/sin in bf16; returned widened to float32 as 4.45's rotation widened them."""
    inv_freq = self.inv_freq.to(device=x.device, dtype=torch.bfloat16)
    freqs = position_ids[..., None].to(torch.bfloat16) * inv_freq
    cos = self.recomposition_frequencies(freqs.cos() * self.attention_scaling)
    sin = self.recomposition_frequencies(freqs.sin() * self.attention_scaling)
    return cos.float(), sin.float()
