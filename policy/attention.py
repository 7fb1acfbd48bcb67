"""Attention pieces of the block-causal Wan transformer.

RoPE at absolute frame positions (computed in float64, as the original Wan does), the frame-level
visibility rule shared by the KV cache and the dense masks, the public mask builders a trainer uses
for teacher-forcing forwards, and self/cross attention computed with the submodules of diffusers'
``WanAttention`` (so PEFT adapters on ``to_q``/``to_k``/``to_v``/``to_out.0`` apply unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the (frame, height, width) rotary axes, as Wan splits them."""
    if head_dim % 2:
        raise ValueError(f"attention_head_dim must be even for rotary embeddings, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[:, None] * freqs[None, :]


def rope_cos_sin(
    head_dim: int,
    frame_positions: torch.Tensor,
    height: int,
    width: int,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin (float64) for tokens laid out frame-major over ``frame_positions x height x width``.

    Returns two tensors ``[len(frame_positions) * height * width, 1, head_dim // 2]``: one angle per
    channel pair (2i, 2i+1). Frame positions are absolute, so keys cached from earlier chunks keep
    the rotation they were written with.
    """
    t_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    device = frame_positions.device
    ang_t = _axis_angles(frame_positions, t_dim, theta)
    ang_h = _axis_angles(torch.arange(height, device=device), h_dim, theta)
    ang_w = _axis_angles(torch.arange(width, device=device), w_dim, theta)
    nf = frame_positions.numel()
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(nf, height, width, -1),
            ang_h[None, :, None, :].expand(nf, height, width, -1),
            ang_w[None, None, :, :].expand(nf, height, width, -1),
        ],
        dim=-1,
    ).reshape(nf * height * width, 1, -1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x [B, S, heads, head_dim]`` in float64; returns ``x``'s dtype."""
    pairs = x.to(torch.float64).unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def frame_visible(
    key_frame: int,
    chunk_end: int,
    local_window: int | None,
    sink_frames: int,
) -> bool:
    """Whether a query in the chunk ending (exclusive) at ``chunk_end`` may attend to ``key_frame``.

    Without a window every earlier frame is visible. With a window of ``W`` frames (the current chunk
    included) and ``S`` sink frames, the first ``S`` frames stay visible and otherwise only the
    ``W - S`` most recent frames up to the chunk's end are kept (LongLive's rolling cache).
    """
    if key_frame >= chunk_end:
        return False
    if local_window is None:
        return True
    return key_frame < sink_frames or key_frame >= chunk_end - (local_window - sink_frames)


def _frame_to_token_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def block_causal_mask(
    num_frames: int,
    frames_per_chunk: int,
    tokens_per_frame: int,
    local_window: int | None = None,
    sink_frames: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[S, S]`` mask (True = may attend), ``S = num_frames * tokens_per_frame``.

    Chunk ``i`` attends to every visible frame of chunks ``<= i`` (bidirectional inside the chunk).
    """
    _check_chunking(num_frames, frames_per_chunk, local_window, sink_frames)
    frame_mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    for q in range(num_frames):
        end = (q // frames_per_chunk + 1) * frames_per_chunk
        for k in range(num_frames):
            frame_mask[q, k] = frame_visible(k, end, local_window, sink_frames)
    return _frame_to_token_mask(frame_mask, tokens_per_frame).to(device)


def teacher_forcing_mask(
    num_frames: int,
    frames_per_chunk: int,
    tokens_per_frame: int,
    local_window: int | None = None,
    sink_frames: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[2S, 2S]`` mask for the sequence ``[clean frames | noisy frames]``.

    Clean frames attend block-causally to clean frames. A noisy chunk attends to the visible clean
    frames of earlier chunks and to its own noisy frames: exactly what a chunk sees during streaming
    generation, where earlier chunks sit in the KV cache as written by their final clean pass.
    """
    _check_chunking(num_frames, frames_per_chunk, local_window, sink_frames)
    n = num_frames
    frame_mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(n):
        start = (q // frames_per_chunk) * frames_per_chunk
        end = start + frames_per_chunk
        for k in range(n):
            frame_mask[q, k] = frame_visible(k, end, local_window, sink_frames)
            frame_mask[n + q, k] = k < start and frame_visible(k, end, local_window, sink_frames)
            frame_mask[n + q, n + k] = start <= k < end
    return _frame_to_token_mask(frame_mask, tokens_per_frame).to(device)


def _check_chunking(num_frames: int, frames_per_chunk: int, local_window: int | None, sink_frames: int) -> None:
    if frames_per_chunk < 1 or num_frames % frames_per_chunk:
        raise ValueError(f"num_frames={num_frames} is not a multiple of frames_per_chunk={frames_per_chunk}")
    check_window(frames_per_chunk, local_window, sink_frames)


def check_window(frames_per_chunk: int, local_window: int | None, sink_frames: int) -> None:
    """A window must hold the sink frames plus one whole chunk."""
    if sink_frames < 0:
        raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
    if local_window is None:
        if sink_frames:
            raise ValueError("sink_frames is only meaningful with a local_window")
        return
    if local_window < sink_frames + frames_per_chunk:
        raise ValueError(
            f"local_window={local_window} must hold sink_frames={sink_frames} plus one chunk of "
            f"frames_per_chunk={frames_per_chunk} frames"
        )


def upcast_apply(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x.float())``, keeping only ``x`` (not its float32 copy) for the backward.

    Wan normalises in float32; a norm on the upcast input would save that float32 copy of a whole
    activation for its backward. Under grad the upcast and ``fn`` are recomputed in the backward
    instead (``torch.utils.checkpoint``, a norm's cost), so a low-precision model saves its activations
    in its own dtype. The values are the same either way."""
    if x.dtype == torch.float32 or not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x.float())
    return checkpoint(lambda t: fn(t.float()), x, use_reentrant=False, preserve_rng_state=False)  # a norm draws no random numbers


def rms_norm_fp32(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Wan's RMSNorm: statistics in float32, cast back, then the learned scale."""
    normed = upcast_apply(lambda t: F.rms_norm(t, (t.shape[-1],), eps=norm.eps), x).to(x.dtype)
    return normed * norm.weight.to(x.dtype) if norm.weight is not None else normed


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Attention over ``[B, S, heads, head_dim]`` tensors; returns ``[B, S_q, heads * head_dim]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def shared_context_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor
) -> torch.Tensor:
    """Each sample ``b`` of ``q, k, v [B, S, heads, head_dim]`` attends to ``[ctx | own k_b, v_b]``, where the
    context ``ctx_k, ctx_v [1, S_ctx, heads, head_dim]`` is the same for every sample; ``[B, S, heads * head_dim]``.

    The context is not copied per sample: keys and values are laid out once as ``[ctx | k_0 | ... | k_{B-1}]``
    and given to every sample as a broadcast view, with a ``[B, 1, 1, S_ctx + B*S]`` mask hiding the other
    samples' own tokens. The price is attention over ``(B - 1) * S`` masked keys per sample, small at the
    learner's micro-batch sizes; where it would more than double the keys a sample attends to (many samples
    of a short context, e.g. the pocket's un-micro-batched replay) the per-sample copy is cheaper and is
    made instead. (SDPA returns no log-sum-exp to merge two separately computed parts with, so one masked
    call it is.)
    """
    b, s = q.shape[:2]
    ctx_k, ctx_v = ctx_k.to(k.dtype), ctx_v.to(v.dtype)
    if b == 1 or ctx_k.shape[1] == 0 or (b - 1) * s > ctx_k.shape[1] + s:
        return scaled_dot_product(q, torch.cat([ctx_k.expand(b, -1, -1, -1), k], 1), torch.cat([ctx_v.expand(b, -1, -1, -1), v], 1))
    keys = torch.cat([ctx_k[0], k.flatten(0, 1)])[None].expand(b, -1, -1, -1)
    values = torch.cat([ctx_v[0], v.flatten(0, 1)])[None].expand(b, -1, -1, -1)
    own = torch.arange(b * s, device=q.device) // s
    visible = torch.cat([torch.ones(b, ctx_k.shape[1], dtype=torch.bool, device=q.device),
                         own[None, :] == torch.arange(b, device=q.device)[:, None]], dim=1)
    return scaled_dot_product(q, keys, values, visible[:, None, None, :])


def project_self_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries, keys (both rotated) and values of a self-attention layer, ``[B, S, heads, head_dim]``."""
    q = rms_norm_fp32(attn.norm_q, attn.to_q(x)).unflatten(2, (attn.heads, -1))
    k = rms_norm_fp32(attn.norm_k, attn.to_k(x)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(x).unflatten(2, (attn.heads, -1))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def project_text_kv(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys/values of the (embedded) text, ``[B, S_text, heads, head_dim]``."""
    k = rms_norm_fp32(attn.norm_k, attn.to_k(text)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(text).unflatten(2, (attn.heads, -1))
    return k, v


def cross_attention(attn, x: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
    q = rms_norm_fp32(attn.norm_q, attn.to_q(x)).unflatten(2, (attn.heads, -1))
    out = scaled_dot_product(q, text_k, text_v)
    return attn.to_out[1](attn.to_out[0](out))
