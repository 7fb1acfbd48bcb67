"""Per-layer self-attention KV cache of the block-causal transformer, plus the cached text K/V.

Storage is preallocated in frame slots: ``[B, capacity * tokens_per_frame, heads, head_dim]`` per
layer. Keys are stored after RoPE at their absolute frame positions, so a cached frame never needs
re-rotation. A chunk forward writes its K/V into its frames' slots; every denoising step of a chunk
overwrites the same slots and the final clean (t = 0) pass leaves the permanent entry.

With a local window of ``W`` frames and ``S`` sink frames the capacity is ``W``: sink frames keep
slots ``0..S-1`` and later frames rotate through the remaining ``W - S`` slots, which evicts the
oldest non-sink frame exactly when it leaves the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy.attention import check_window, frame_visible, scaled_dot_product, shared_context_attention


@dataclass(frozen=True)
class ChunkSlots:
    """Where a chunk's frames go and which cached tokens it attends to (computed once per forward)."""

    start_frame: int
    num_frames: int
    write: bool
    chunk_slots: tuple[int, ...]
    context_index: slice | torch.Tensor  # visible cached tokens of frames before the chunk
    full_index: slice | torch.Tensor | None  # visible cached tokens including the chunk (write only)


def _token_index(slots: list[int], tokens_per_frame: int, device) -> slice | torch.Tensor:
    """A slice when the slots are contiguous (no copy when reading), else a gather index."""
    if not slots or slots == list(range(slots[0], slots[0] + len(slots))):
        first = slots[0] if slots else 0
        return slice(first * tokens_per_frame, (first + len(slots)) * tokens_per_frame)
    idx = torch.tensor(slots, device=device)[:, None] * tokens_per_frame + torch.arange(tokens_per_frame, device=device)
    return idx.flatten()


def _take(buffer: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    return buffer[:, index] if isinstance(index, slice) else buffer.index_select(1, index)


class KVCache:
    """Self-attention K/V of every layer for a batch of videos, and the text K/V of cross-attention."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        max_frames: int,
        local_window: int | None = None,
        sink_frames: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        _buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> None:
        check_window(1, local_window, sink_frames)
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.heads = heads
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.max_frames = max_frames
        self.local_window = local_window
        self.sink_frames = sink_frames
        self.capacity = max_frames if local_window is None else min(local_window, max_frames)
        self.device = torch.device(device)
        self.dtype = dtype
        if _buffers is None:
            shape = (batch_size, self.capacity * tokens_per_frame, heads, head_dim)
            _buffers = (
                [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)],
                [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)],
            )
        self.keys, self.values = _buffers
        self.slot_frames: list[int] = [-1] * self.capacity
        self.text_keys: list[torch.Tensor] | None = None
        self.text_values: list[torch.Tensor] | None = None
        self.read_only = False

    @classmethod
    def for_model(
        cls,
        model,
        batch_size: int,
        max_frames: int,
        tokens_per_frame: int,
        local_window: int | None = None,
        sink_frames: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache for ``model`` in its compute dtype (``model.compute_dtype`` where it has one) unless
        ``dtype`` is given, on its device unless ``device`` is."""
        cfg = model.config
        param = next(model.parameters())
        return cls(
            num_layers=cfg.num_layers,
            batch_size=batch_size,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            tokens_per_frame=tokens_per_frame,
            max_frames=max_frames,
            local_window=local_window,
            sink_frames=sink_frames,
            dtype=dtype or getattr(model, "compute_dtype", param.dtype),
            device=device or param.device,
        )

    # ----------------------------------------------------------------------------------- slots
    def slot_of(self, frame: int) -> int:
        if frame < 0 or frame >= self.max_frames:
            raise IndexError(f"frame {frame} is outside the cache's 0..{self.max_frames - 1}")
        if self.local_window is None or frame < self.sink_frames:
            return frame
        ring = self.capacity - self.sink_frames
        return self.sink_frames + (frame - self.sink_frames) % ring

    @property
    def cached_frames(self) -> list[int]:
        """Absolute indices of the frames held now, in slot order."""
        return [f for f in self.slot_frames if f >= 0]

    def plan_chunk(self, start_frame: int, num_frames: int, write: bool) -> ChunkSlots:
        """Reserve the chunk's slots (when writing) and list the tokens it attends to."""
        end = start_frame + num_frames
        slots = [self.slot_of(f) for f in range(start_frame, end)]
        if len(set(slots)) != len(slots):
            raise ValueError(
                f"a chunk of {num_frames} frames does not fit in local_window={self.local_window} "
                f"with sink_frames={self.sink_frames}"
            )
        if write and self.read_only:
            raise RuntimeError("this cache holds broadcast views (expand(copy=False)); forward with write_cache=False")
        if write:
            for frame, slot in zip(range(start_frame, end), slots):
                self.slot_frames[slot] = frame
        visible = [
            slot
            for slot, frame in enumerate(self.slot_frames)
            if frame >= 0 and frame_visible(frame, end, self.local_window, self.sink_frames)
        ]
        context = [s for s in visible if self.slot_frames[s] < start_frame]
        tpf = self.tokens_per_frame
        return ChunkSlots(
            start_frame=start_frame,
            num_frames=num_frames,
            write=write,
            chunk_slots=tuple(slots),
            context_index=_token_index(context, tpf, self.device),
            full_index=_token_index(visible, tpf, self.device) if write else None,
        )

    # ----------------------------------------------------------------------------- attention
    def attend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, chunk: ChunkSlots
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values the chunk attends to in ``layer``; writes the chunk's own K/V first if asked.

        When the chunk's K/V carry gradient they are concatenated to the (gradient-free) context
        instead of being read back from the buffer, so gradients reach the chunk's projections.
        """
        if k.shape[0] != self.batch_size:
            raise ValueError(f"chunk batch {k.shape[0]} != cache batch {self.batch_size}; expand the cache first")
        if chunk.write:
            tpf = self.tokens_per_frame
            for i, slot in enumerate(chunk.chunk_slots):
                self.keys[layer][:, slot * tpf : (slot + 1) * tpf] = k[:, i * tpf : (i + 1) * tpf].detach()
                self.values[layer][:, slot * tpf : (slot + 1) * tpf] = v[:, i * tpf : (i + 1) * tpf].detach()
            if not (k.requires_grad or v.requires_grad):
                return _take(self.keys[layer], chunk.full_index), _take(self.values[layer], chunk.full_index)
        ctx_k = _take(self.keys[layer], chunk.context_index)
        ctx_v = _take(self.values[layer], chunk.context_index)
        return torch.cat([ctx_k, k.to(ctx_k.dtype)], dim=1), torch.cat([ctx_v, v.to(ctx_v.dtype)], dim=1)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: ChunkSlots) -> torch.Tensor:
        """Self-attention output ``[B, S, heads * head_dim]`` of the chunk's queries over ``attend``'s keys.

        A read-only cache whose storage is one video broadcast to the batch (``expand(copy=False)``, as the
        learner's pivot replay builds it) hands its context to ``shared_context_attention`` once, instead
        of concatenating a copy of it to every sample's own K/V."""
        if not chunk.write and self.batch_size > 1 and self.keys[layer].stride(0) == 0:
            ctx_k = _take(self.keys[layer][:1], chunk.context_index)
            ctx_v = _take(self.values[layer][:1], chunk.context_index)
            return shared_context_attention(q, k, v, ctx_k, ctx_v)
        return scaled_dot_product(q, *self.attend(layer, k, v, chunk))

    def has_text(self) -> bool:
        return self.text_keys is not None

    def set_text(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.text_keys, self.text_values = keys, values

    def clear_text(self) -> None:
        self.text_keys = self.text_values = None

    # ------------------------------------------------------------------------------ batching
    def expand(self, batch_size: int, copy: bool = True) -> KVCache:
        """A new cache holding this batch-1 cache's content repeated ``batch_size`` times.

        ``copy=False`` gives broadcast views (no memory) for a cache that will only be read, i.e.
        forwards with ``write_cache=False``; writing into such a cache raises.
        """
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 cache can be expanded, this one has batch {self.batch_size}")

        def rep(t: torch.Tensor) -> torch.Tensor:
            view = t.expand(batch_size, -1, -1, -1)
            return view.clone() if copy else view

        out = self._like(batch_size, ([rep(k) for k in self.keys], [rep(v) for v in self.values]))
        out.read_only = not copy
        if self.text_keys is not None:
            # Text K/V are read-only after the first chunk: broadcast views, no copy.
            out.set_text(
                [k.expand(batch_size, -1, -1, -1) for k in self.text_keys],
                [v.expand(batch_size, -1, -1, -1) for v in self.text_values],
            )
        return out

    def clone(self) -> KVCache:
        out = self._like(self.batch_size, ([k.clone() for k in self.keys], [v.clone() for v in self.values]))
        if self.text_keys is not None:
            out.set_text(list(self.text_keys), list(self.text_values))
        return out

    def _like(self, batch_size: int, buffers) -> KVCache:
        out = KVCache(
            num_layers=self.num_layers,
            batch_size=batch_size,
            heads=self.heads,
            head_dim=self.head_dim,
            tokens_per_frame=self.tokens_per_frame,
            max_frames=self.max_frames,
            local_window=self.local_window,
            sink_frames=self.sink_frames,
            dtype=self.dtype,
            device=self.device,
            _buffers=buffers,
        )
        out.slot_frames = list(self.slot_frames)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
