"""Mixed precision for LoRA adapters on a low-precision base: float32 adapter, base-dtype compute.

A trained adapter lives in float32 (its tensors, hence its gradients, the optimiser state and the
saved adapter), because an Adam step of ``lr = 1e-5`` on a bfloat16 weight is mostly below half an
ulp and rounds away. The frozen base keeps its dtype, and the adapter's matmuls run in that dtype:

- the float32 upcast is peft's own ``cast_adapter_dtype`` (what ``get_peft_model(...,
  autocast_adapter_dtype=True)`` does; diffusers' ``add_adapter`` does not call it);
- peft's LoRA forward would then cast the layer's input up to float32 (``_cast_input_dtype``), which
  saves a float32 copy of every adapted activation for the backward. Instead the input cast is turned
  off (peft's ``cast_input_dtype_enabled`` flag, the one ``peft.helpers.disable_input_dtype_casting``
  sets) and each LoRA layer runs under ``torch.autocast`` in its base weight's dtype, entered and left
  by forward hooks on that layer only. Autocast rounds the float32 adapter weights to the base dtype
  for the matmul and sends gradients back to the float32 tensors. An autocast around the whole model
  was not used: it would also run the float32-kept modules (time embedding, modulation, norms) in
  bfloat16 and make the learner's numerics differ from the rollout workers', whose adapter is held in
  the base dtype. With the same rounding of the adapter weights both compute the same forward.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype

_HOOKED = "_lora_compute_autocast_hooks"


def _enter_autocast(module: LoraLayer, args) -> None:
    x = args[0]
    context = torch.autocast(device_type=x.device.type, dtype=module.get_base_layer().weight.dtype)
    context.__enter__()
    module._lora_autocast_stack.append(context)


def _exit_autocast(module: LoraLayer, args, output) -> None:
    if module._lora_autocast_stack:
        module._lora_autocast_stack.pop().__exit__(None, None, None)


def compute_in_base_dtype(layer: LoraLayer) -> None:
    """Run ``layer``'s adapters in its base weight's dtype (idempotent; a no-op on a float32 base)."""
    if getattr(layer, _HOOKED, False) or layer.get_base_layer().weight.dtype == torch.float32:
        return
    layer.cast_input_dtype_enabled = False
    layer._lora_autocast_stack = []
    layer.register_forward_pre_hook(_enter_autocast)
    # always_call: the autocast is left even when the forward raises.
    layer.register_forward_hook(_exit_autocast, always_call=True)
    setattr(layer, _HOOKED, True)


def keep_adapter_in_float32(transformer: torch.nn.Module, name: str) -> None:
    """Adapter ``name``'s tensors in float32 (peft's ``cast_adapter_dtype``), computed in the base dtype.

    peft replaces the adapter's parameters by new float32 ones, so call this before an optimiser
    takes them. On a float32 base nothing changes."""
    cast_adapter_dtype(transformer, name, autocast_adapter_dtype=True)
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            compute_in_base_dtype(module)
