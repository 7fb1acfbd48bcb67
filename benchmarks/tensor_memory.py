"""Live tensor bytes of a piece of code, on the CPU (measured) or on the ``meta`` device (simulated).

``TensorMemory`` is a ``TorchDispatchMode``: every storage an operator returns that none of its inputs
owned is a new allocation; a finaliser on the storage frees it. ``peak`` is the most bytes alive at
once since the mode was entered, counting only storages allocated inside it (weights made before
are not counted). This is what a GPU caching allocator's ``memory_allocated`` reports, without its
block rounding. On ``meta`` tensors (shapes and dtypes, no data) the same code runs in no time at
any size, which is how the planner sizes real-width forwards and backwards.

``flash_attention_on_meta`` makes ``F.scaled_dot_product_attention`` on meta tensors take the fused
flash kernel's path, as it does on a GPU (and on the CPU): without it, meta dispatch falls back to
the math path, which stores the full attention matrix for the backward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3


def _storages(tree) -> list[torch.UntypedStorage]:
    out = []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
            out.append(leaf.untyped_storage())
    return out


class TensorMemory(TorchDispatchMode):
    """Counts bytes of the storages allocated (and not yet freed) inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {s._cdata for s in _storages((args, kwargs))}
        for storage in _storages(out):
            key = storage._cdata
            if key in owned or key in self._alive:
                continue  # a view or an in-place result: no new memory
            size = storage.nbytes()
            self._alive[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Patches ``F.scaled_dot_product_attention`` (not a mode: a checkpoint's recompute in the backward
    must see it too) so that meta calls run the fused kernel's meta function, which saves q, k, v, the
    output and the log-sum-exp (and the additive mask, if any), like the GPU's flash / memory-efficient
    kernels and the CPU's flash kernel."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if q.device.type == "meta" and not kwargs:
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
            fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return fused(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_tensor_bytes(fn) -> tuple[object, int]:
    """``fn()``'s result and the bytes of the distinct storages autograd saved for its backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())
