"""Astrolabe NFT's streaming window: the NFT loss on a window of chunks of a group's clean endpoints,
each chunk re-noised and predicted on the branch's earlier clean chunks through a rolling KV cache
(`RollingContext`) under each of the models the loss compares (`AdapterSwitch`), one backward per
chunk (`nft_group_update`). The loss itself is `learner.objectives.nft.loss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from learner.objectives.nft.loss import nft_forward_noise, nft_loss, selective_reg_loss
from policy.lora import adapter_names
from policy.pipeline import StreamingVideoPolicy
from policy.sampler import x0_from_flow
from replay.record import CandidateGroup


class AdapterSwitch:
    """Runs the transformer under one of its LoRA adapters (or none: the frozen base) for a block, then
    returns to `home`, the trained adapter, active and trainable.

    The LoRA layers are collected once and switched directly (peft's per-layer `set_adapter`), which
    keeps a switch cheap enough to do several times per chunk; switched-to adapters are frozen.
    """

    def __init__(self, transformer: torch.nn.Module, home: str) -> None:
        if home not in adapter_names(transformer):
            raise KeyError(f"no adapter named {home!r} on the transformer (adapters: {adapter_names(transformer)})")
        self.layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        self.home = home
        self.current: tuple[str | None] | None = None  # the adapter switched to (a 1-tuple: None is the base)
        self._go_home()

    def _go_home(self) -> None:
        for layer in self.layers:
            layer.set_adapter(self.home)
            if layer.disable_adapters:
                layer.enable_adapters(True)

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        if name == self.home or (self.current is not None and self.current == (name,)):
            yield  # already there (the home adapter, or a nested block under the same one)
            return
        self.current = (name,)
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            self.current = None
            self._go_home()


class RollingContext:
    """The clean history of a batch of branches under one adapter: a KV cache advanced chunk by chunk.

    Every write is a `t = context_timestep` forward of a clean chunk without gradient, exactly how
    generation fills the cache, so a prediction sees what the model saw while streaming. With the
    preset's local window and sink frames the cache rotates (the oldest non-sink frame is evicted as
    the next chunk is written), so its size is bounded by the window, not by the video's length.
    Each adapter keeps its own context: a model's prediction depends on its own keys and values of
    the earlier chunks.
    """

    def __init__(
        self,
        policy: StreamingVideoPolicy,
        text: torch.Tensor,
        switch: AdapterSwitch,
        adapter: str | None,
        shared: torch.Tensor,
        batch: int,
    ) -> None:
        self.policy, self.text, self.switch, self.adapter = policy, text, switch, adapter
        self.next_frame = 0
        self.cache = policy.new_cache(1)
        for start in range(0, shared.shape[0], policy.frames_per_chunk):  # shared by every branch: batch 1
            self.append(shared[None, start : start + policy.frames_per_chunk])
        self.cache = self.cache.expand(batch)

    def append(self, clean: torch.Tensor) -> None:
        """Write the next clean chunk `[B, f, C, H, W]` into the cache."""
        b, f = clean.shape[:2]
        t = torch.full((b, f), self.policy.sampler.context_timestep, device=self.policy.device)
        with self.switch.use(self.adapter), torch.no_grad():
            self.policy.transformer.forward_chunk(clean, t, self.cache, self.next_frame, self.text)
        self.next_frame += f

    def predict(self, x_t: torch.Tensor, timestep: float, grad: bool = False) -> torch.Tensor:
        """x0 prediction `[B, f, C, H, W]` for the next chunk noised to `x_t` at raw `timestep`.

        With `grad`, the text K/V are recomputed inside the graph (adapters on the cross-attention
        projections get gradient); the context K/V stay gradient-free."""
        b, f = x_t.shape[:2]
        t = torch.full((b, f), float(timestep), device=self.policy.device)
        cache = self.cache
        saved = (cache.text_keys, cache.text_values)
        with self.switch.use(self.adapter), torch.set_grad_enabled(grad):
            if grad:
                cache.clear_text()
            try:
                flow = self.policy.transformer.forward_chunk(x_t, t, cache, self.next_frame, self.text, write_cache=False)
            finally:
                if grad:
                    cache.text_keys, cache.text_values = saved
            return x0_from_flow(x_t, flow, float(timestep) / self.policy.sampler.num_train_timesteps)

    def predict_and_append(self, x_t: torch.Tensor, timestep: float, clean: torch.Tensor) -> torch.Tensor:
        """`predict` (no grad) then `append(clean)`, under one adapter switch."""
        with self.switch.use(self.adapter):
            x0 = self.predict(x_t, timestep)
            self.append(clean)
        return x0


@dataclass(frozen=True)
class NftAdapters:
    trainable: str
    old: str  # the EMA "old" adapter, the sampling policy
    reference: str | None = None  # selective regularisation's reference; None: KL to the frozen base


@dataclass
class NftChunkStats:
    chunk: int
    timestep: float
    loss: float  # policy + kl_beta * regulariser
    policy_loss: float
    kl_loss: float  # to the frozen base (0 in selective mode)
    reg_loss: float  # selective regulariser to the reference (0 when off or none selected)
    old_deviation: float


def nft_group_update(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    branches: torch.Tensor,
    r: torch.Tensor,
    window: range,
    draws: list[tuple[float, torch.Tensor]],
    adapters: NftAdapters,
    switch: AdapterSwitch,
    beta: float,
    kl_beta: float,
    selected: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    normalize_errors: bool = False,
) -> list[NftChunkStats]:
    """Astrolabe's NFT loss on a window of chunks of `branches`' clean endpoints, chunk by chunk, with
    one backward per chunk (`loss * loss_scale`), so memory holds one chunk's graph at a time.

    For chunk c of `window`: x_t = forward-noised clean chunk at `draws[k] = (t, noise [B, f, C, H, W])`;
    x0 predictions of the old adapter and the regulariser's model (no grad) and of the trainable
    adapter (grad), each on its own rolling context of the branch's clean chunks before c; then
    chunk c is written into every context. `r [B]` are the reward weights; `selected [B]` (bool)
    marks the branches the selective regulariser pulls towards `adapters.reference`, whose model
    runs on those branches only.
    """
    f = policy.frames_per_chunk
    latents = _window_latents(policy, group, branches, window, len(draws))  # [B, F, C, H, W]
    selective = adapters.reference is not None
    if selective and (selected is None or selected.shape != r.shape):
        raise ValueError("selective regularisation needs a bool mask `selected` over the branches")
    rows = torch.nonzero(selected).flatten() if selective else None
    streams = _open_streams(policy, group, latents, window.start, adapters, switch, kl_beta, rows)

    r = r.to(policy.device, torch.float32)
    out = []
    for (t, noise), c in zip(draws, window):
        clean = _chunk(latents, c, f)
        x_t = nft_forward_noise(clean, noise.to(clean.device, clean.dtype), float(t))
        preds = {}
        for name in ("old", "base", "ref"):
            if name in streams:
                part = rows if name == "ref" else slice(None)
                preds[name] = streams[name].predict_and_append(x_t[part], t, clean[part]).float()
        x0_theta = streams["theta"].predict(x_t, t, grad=True).float()
        target = clean.float()
        loss, stats = nft_loss(x0_theta, preds["old"], preds.get("base"), target, r, beta,
                               0.0 if selective else kl_beta, normalize_errors)
        reg = torch.zeros(())
        if selective:
            reference = x0_theta.detach().clone()
            if len(rows):
                reference[rows] = preds["ref"]
            reg = selective_reg_loss(x0_theta, reference, selected.to(x0_theta.device))
            loss = loss + kl_beta * reg
        (loss * loss_scale).backward()
        streams["theta"].append(clean)
        out.append(NftChunkStats(c, float(t), float(loss.detach()), float(stats.policy_loss), float(stats.kl_loss),
                                 float(reg.detach()), float(stats.old_deviation)))
    return out


def _window_latents(policy: StreamingVideoPolicy, group: CandidateGroup, branches: torch.Tensor, window: range,
                    num_draws: int) -> torch.Tensor:
    """`branches`' clean endpoints on the policy's device, checked against the window and its draws."""
    if group.final_latents is None:
        raise ValueError(f"group {group.group_id} has no final_latents; NFT trains on rollouts recorded with record_final_latents")
    f, num_chunks = policy.frames_per_chunk, group.num_chunks
    latents = group.final_latents[branches].to(policy.device, policy.dtype)  # [B, F, C, H, W]
    if latents.shape[1] != num_chunks * f:
        raise ValueError(f"group {group.group_id}: final_latents has {latents.shape[1]} frames, expected {num_chunks} chunks of {f}")
    if not (0 <= window.start < window.stop <= num_chunks) or num_draws != len(window):
        raise ValueError(f"window {window} must lie in 0..{num_chunks} with one draw per chunk (got {num_draws})")
    return latents


def _open_streams(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    latents: torch.Tensor,
    start: int,
    adapters: NftAdapters,
    switch: AdapterSwitch,
    kl_beta: float,
    rows: torch.Tensor | None,
) -> dict[str, RollingContext]:
    """The rolling contexts of the models the loss compares, filled with the branches' clean chunks
    before chunk `start`: "theta" (trainable), "old", and "base" (KL to the frozen base) or "ref"
    (selective regulariser, on the selected `rows` only)."""
    if len(group.prompt_schedule) > 1:
        raise ValueError(f"group {group.group_id} switches prompts; the NFT rolling context runs one prompt")
    f, batch = policy.frames_per_chunk, latents.shape[0]
    text = policy.text_conditioning([group.prompt])
    shared = latents[0, : min(start, group.pivot) * f]  # identical in every branch before the pivot
    streams = {name: RollingContext(policy, text, switch, adapter, shared, batch)
               for name, adapter in (("theta", adapters.trainable), ("old", adapters.old))}
    if rows is None and kl_beta > 0:
        streams["base"] = RollingContext(policy, text, switch, None, shared, batch)
    if rows is not None and len(rows):
        streams["ref"] = RollingContext(policy, text, switch, adapters.reference, shared, len(rows))
    for c in range(shared.shape[0] // f, start):  # branch-specific chunks before the window
        for name, stream in streams.items():
            stream.append(_chunk(latents, c, f, rows if name == "ref" else None))
    return streams


def _chunk(latents: torch.Tensor, c: int, f: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    part = latents[:, c * f : (c + 1) * f]
    return part if rows is None else part[rows]
