"""Block-causal Wan transformer: diffusers' ``WanTransformer3DModel`` run chunk by chunk with a KV cache.

The class adds no parameters and renames nothing: config, state-dict keys and PEFT target names are
those of diffusers, and the inherited ``forward`` is diffusers' bidirectional forward. The added
entry points take latents frames-first ``[B, F, C, H, W]`` and per-frame timesteps ``[B, F]``:

- ``forward_chunk``: one chunk starting at absolute frame ``start_frame``, attending to the KV cache
  (earlier chunks) and to itself, writing its own K/V into the cache.
- ``forward_dense``: a whole sequence in one call under a block-causal mask, optionally with a clean
  copy of the sequence as context (teacher forcing), the training-side twin of ``forward_chunk``.

Numerics follow the original Wan code: float64 sinusoidal time embedding and RoPE, float32
statistics for RMSNorm/LayerNorm, float32 modulation.

The blocks are diffusers' own ``WanTransformerBlock.forward``: the KV cache enters through the attention
processor seam (``policy.causal_processors``, installed with ``set_attn_processor``), per-frame
timesteps through the block's own modulation with each frame folded into a row (``fold_frames``), and
the norms keep no float32 copy for the backward (``policy.upcast_norm``). The output head is the only
block-level code kept here (``_head``): diffusers writes it inline in ``WanTransformer3DModel.forward``,
so it cannot be called on its own. ``tests/policy/test_diffusers_seam.py`` fails when either changes.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import WanTransformer3DModel

from policy.attention import (
    block_causal_mask,
    project_text_kv,
    rope_cos_sin,
    teacher_forcing_mask,
    upcast_apply,
)
from policy.causal_processors import SelfAttentionPlan, TextKV, causal_processors, fold_frames
from policy.kv_cache import KVCache
from policy.upcast_norm import recompute_block_norm_upcasts


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's ``[cos, sin]`` timestep embedding, computed in float64. ``timesteps`` is 1-D."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = timesteps.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 transformer with block-causal, KV-cached forwards (see module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.patch_size[0] != 1:
            raise ValueError(f"block-causal generation needs a temporal patch of 1, got patch_size={cfg.patch_size}")
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise ValueError("image conditioning (image_dim / added_kv_proj_dim) is not supported by the causal model")
        self.set_attn_processor(causal_processors(cfg.num_layers))
        for block in self.blocks:
            recompute_block_norm_upcasts(block)
        self.forward_calls = 0  # model calls
        self.sample_forwards = 0  # model calls weighted by batch size: one per video per chunk forward

    # diffusers reads a model's config fields from its __init__ signature (from_pretrained, from_config)
    __init__.__signature__ = inspect.signature(WanTransformer3DModel.__init__)

    def cast(self, dtype: torch.dtype, device: torch.device | str | None = None) -> CausalWanTransformer3DModel:
        """Move to ``dtype``/``device`` keeping diffusers' ``_keep_in_fp32_modules`` in float32."""
        keep = set(self._keep_in_fp32_modules or ())
        for name, param in self.named_parameters():
            target = torch.float32 if keep & set(name.split(".")) else dtype
            param.data = param.data.to(device=device, dtype=target)
        for name, buf in self.named_buffers():
            buf.data = buf.data.to(device=device)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the activations, keys/values and outputs: the cast weights' dtype, not that of the
        float32-kept modules (``scale_shift_table`` and the time embedding come first in ``parameters()``)."""
        return self.proj_out.weight.dtype

    # ------------------------------------------------------------------------------ geometry
    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch {ph}x{pw}")
        return (height // ph) * (width // pw)

    def new_kv_cache(
        self,
        batch_size: int,
        max_frames: int,
        height: int,
        width: int,
        local_window: int | None = None,
        sink_frames: int = 0,
    ) -> KVCache:
        return KVCache.for_model(
            self, batch_size, max_frames, self.tokens_per_frame(height, width), local_window, sink_frames
        )

    # ---------------------------------------------------------------------------- embeddings
    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[2] != self.config.in_channels:
            raise ValueError(
                f"latents must be [B, F, C={self.config.in_channels}, H, W], got shape {tuple(latents.shape)}"
            )
        self.tokens_per_frame(*latents.shape[3:])

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(latents.permute(0, 2, 1, 3, 4).to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2).contiguous()

    def _time_embedding(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame ``temb [B, F, dim]`` and block modulation ``[B, F, 6, dim]`` (float32).

        diffusers' modules, not ``condition_embedder.forward``: that computes the sinusoid in float32
        (Wan: float64), casts ``temb`` to the text's dtype, and embeds the text in the same call (a
        chunk forward embeds it once per video, into the cache)."""
        emb = self.condition_embedder
        sinus = sinusoidal_embedding(timesteps.flatten(), self.config.freq_dim)
        temb = emb.time_embedder(sinus.to(emb.time_embedder.linear_1.weight.dtype))
        mod = emb.time_proj(emb.act_fn(temb.to(emb.time_proj.weight.dtype)))
        shape = timesteps.shape
        return temb.float().unflatten(0, shape), mod.float().unflatten(0, shape).unflatten(-1, (6, -1))

    def text_kv(self, encoder_hidden_states: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cross-attention K/V of every layer for a text conditioning ``[B, S, text_dim]``."""
        text = self.condition_embedder.text_embedder(encoder_hidden_states.to(self.proj_out.weight.dtype))
        keys, values = [], []
        for block in self.blocks:
            k, v = project_text_kv(block.attn2, text)
            keys.append(k)
            values.append(v)
        return keys, values

    @staticmethod
    def _per_frame_timesteps(timesteps: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        t = torch.as_tensor(timesteps)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None].expand(batch, frames)
        if t.shape != (batch, frames):
            raise ValueError(f"timesteps must be [B], [B, F] or a scalar for B={batch}, F={frames}; got {tuple(t.shape)}")
        return t

    # -------------------------------------------------------------------------------- blocks
    def _run_blocks(self, x: torch.Tensor, mod: torch.Tensor, text: TextKV, plan: SelfAttentionPlan) -> torch.Tensor:
        """diffusers' blocks on ``x [B, F * T, dim]`` with modulation ``mod [B, F, 6, dim]``; returns the
        tokens folded ``[B * F, T, dim]``. The call's state rides in the block's ``encoder_hidden_states``
        and ``rotary_emb`` arguments, so a checkpointed block recomputes with its own (see causal_processors)."""
        x, temb = fold_frames(x, mod.shape[1]), mod.flatten(0, 1)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                # diffusers' seam (`enable_gradient_checkpointing`): torch.utils.checkpoint per block.
                x = self._gradient_checkpointing_func(block, x, text, temb, plan)
            else:
                x = block(x, text, temb, plan)
        return x

    def _head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Output norm, projection and unpatchify of ``x [B, F, T, dim]`` to frames-first ``[B, F, C, H, W]``.

        diffusers' head (the end of ``WanTransformer3DModel.forward``, inline there) with ``temb [B, F, dim]``
        per frame, and the norm's float32 upcast recomputed in the backward (``upcast_apply``)."""
        b, frames = x.shape[:2]
        _, hp, wp = grid
        shift, scale = (self.scale_shift_table.float()[:, None] + temb[:, :, None]).chunk(2, dim=2)
        x = (upcast_apply(self.norm_out, x) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        _, ph, pw = self.config.patch_size
        x = x.reshape(b, frames, hp, wp, ph, pw, -1)  # temporal patch is 1
        return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, frames, -1, hp * ph, wp * pw)

    def _text_for_batch(self, keys: list[torch.Tensor], values: list[torch.Tensor], batch: int) -> TextKV:
        if keys[0].shape[0] == 1 and batch > 1:
            keys = [k.expand(batch, -1, -1, -1) for k in keys]
            values = [v.expand(batch, -1, -1, -1) for v in values]
        return TextKV(keys, values)

    def _rope(self, frame_positions: torch.Tensor, hp: int, wp: int):
        return rope_cos_sin(self.config.attention_head_dim, frame_positions, hp, wp)

    def _count(self, batch: int) -> None:
        self.forward_calls += 1
        self.sample_forwards += batch

    # ------------------------------------------------------------------------ entry points
    def forward_chunk(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        kv_cache: KVCache,
        start_frame: int,
        encoder_hidden_states: torch.Tensor | None = None,
        write_cache: bool = True,
    ) -> torch.Tensor:
        """Flow prediction ``[B, f, C, H, W]`` for one chunk starting at absolute frame ``start_frame``.

        Attends to the cached frames visible from this chunk and to the chunk itself. With
        ``write_cache`` the chunk's K/V (after RoPE) overwrite its slots in ``kv_cache``. The text
        K/V are computed from ``encoder_hidden_states`` on the first call and cached after that.
        """
        self._check_latents(latents)
        b, frames, _, h, w = latents.shape
        t = self._per_frame_timesteps(timesteps, b, frames)
        _, ph, pw = self.config.patch_size
        grid = (frames, h // ph, w // pw)
        if b != kv_cache.batch_size:
            raise ValueError(f"chunk batch {b} != cache batch {kv_cache.batch_size}; expand the cache first")

        if not kv_cache.has_text():
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required until the cache holds the text K/V")
            text = self._text_for_batch(*self.text_kv(encoder_hidden_states), b)
            kv_cache.set_text(text.keys, text.values)

        x = self._patchify(latents)
        temb, mod = self._time_embedding(t)
        positions = torch.arange(start_frame, start_frame + frames, device=x.device)
        cos, sin = self._rope(positions, grid[1], grid[2])
        plan = SelfAttentionPlan(b, cos, sin, kv_cache=kv_cache, chunk=kv_cache.plan_chunk(start_frame, frames, write_cache))
        self._count(b)
        x = self._run_blocks(x, mod, TextKV(kv_cache.text_keys, kv_cache.text_values), plan)
        return self._head(x.unflatten(0, (b, frames)), temb, grid)

    def forward_dense(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        frames_per_chunk: int,
        clean_latents: torch.Tensor | None = None,
        clean_timesteps: torch.Tensor | None = None,
        local_window: int | None = None,
        sink_frames: int = 0,
        start_frame: int = 0,
    ) -> torch.Tensor:
        """Flow prediction ``[B, F, C, H, W]`` for a whole sequence in one call.

        Without ``clean_latents``: chunk ``i`` attends to chunks ``<= i`` of the same sequence
        (``block_causal_mask``). With ``clean_latents`` (teacher forcing): the model runs on
        ``[clean | noisy]`` and each noisy chunk attends to the clean copy of earlier chunks and to
        itself (``teacher_forcing_mask``); ``clean_timesteps`` default to 0. Only the noisy part's
        prediction is returned. The clean copy shares the noisy copy's RoPE positions.
        """
        self._check_latents(latents)
        b, frames, _, h, w = latents.shape
        t = self._per_frame_timesteps(timesteps, b, frames)
        _, ph, pw = self.config.patch_size
        grid = (frames, h // ph, w // pw)
        tpf = grid[1] * grid[2]
        positions = torch.arange(start_frame, start_frame + frames, device=latents.device)

        if clean_latents is None:
            x = self._patchify(latents)
            temb, mod = self._time_embedding(t)
            cos, sin = self._rope(positions, grid[1], grid[2])
            mask = block_causal_mask(frames, frames_per_chunk, tpf, local_window, sink_frames, x.device)
        else:
            if clean_latents.shape != latents.shape:
                raise ValueError(f"clean_latents {tuple(clean_latents.shape)} != latents {tuple(latents.shape)}")
            ct = torch.zeros_like(t) if clean_timesteps is None else self._per_frame_timesteps(clean_timesteps, b, frames)
            x = self._patchify(torch.cat([clean_latents, latents], dim=1))
            temb, mod = self._time_embedding(torch.cat([ct, t], dim=1))
            cos, sin = self._rope(torch.cat([positions, positions]), grid[1], grid[2])
            mask = teacher_forcing_mask(frames, frames_per_chunk, tpf, local_window, sink_frames, x.device)
        self._count(b)

        text = self._text_for_batch(*self.text_kv(encoder_hidden_states), b)
        x = self._run_blocks(x, mod, text, SelfAttentionPlan(b, cos, sin, mask=mask)).unflatten(0, (b, -1))
        if clean_latents is not None:
            x, temb = x[:, frames:], temb[:, frames:]
        return self._head(x, temb, grid)
