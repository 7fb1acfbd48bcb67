"""The losses of one candidate group under the current policy, one function per objective.

AR-CoPO and SDE-GRPO replay the stored pivot chunk through the current policy (the prefix KV cache
rebuilt from the stored clean prefix, without gradient). Astrolabe NFT re-noises the clean endpoints
of a window of chunks, each conditioned on the branch's earlier clean chunks through a rolling KV
cache (`RollingContext`, `nft_group_update`). All hand tensors to the pure objectives in
`learner.objectives`, `learner.sde_grpo` and `learner.nft`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from learner.nft import nft_forward_noise, nft_loss, selective_reg_loss
from learner.objectives import copo_loss_with_stats
from learner.sde_grpo import sde_grpo_loss_with_stats, sde_step_log_prob
from policy.lora import adapter_names
from policy.pipeline import StreamingVideoPolicy
from policy.pivot_replay import rebuild_prefix_cache, replay_pivot_chunk
from policy.sampler import x0_from_flow
from replay.record import CandidateGroup


@dataclass
class GroupLoss:
    loss: torch.Tensor  # scalar with grad
    clip_fraction: float
    ratio_deviation: float  # max |rho - 1| (how far the update moved the surrogate policy)


def _replay_steps(policy: StreamingVideoPolicy, group: CandidateGroup, branches: torch.Tensor, steps: range) -> torch.Tensor:
    """x0 predictions of the current policy on the stored inputs of `branches` x `steps`: [B, len(steps), f, C, H, W]."""
    text = policy.text_conditioning([group.prompt])
    cache = rebuild_prefix_cache(policy, text, group.prefix_latents)
    step_index = torch.tensor(list(steps))
    x_t = group.pivot_inputs[branches][:, step_index]  # [B, S, f, C, H, W]
    t = group.timesteps[step_index][None].expand(len(branches), -1)
    x0 = replay_pivot_chunk(policy, text, group.prefix_latents, x_t.flatten(0, 1), t.flatten(), prefix_cache=cache)
    return x0.unflatten(0, (len(branches), len(steps)))


def copo_group_loss(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    advantages: torch.Tensor,
    anchors: torch.Tensor,
    tau: float | str,
    clip_eps: float | None,
) -> GroupLoss:
    """AR-CoPO on one group: the anchors' replayed x0 against every candidate's old x0, averaged over
    the pivot chunk's T denoising steps (all B x T replays in one batched forward)."""
    T = group.num_steps
    x0_theta = _replay_steps(policy, group, anchors, range(T)).float()  # [B, T, ...]
    x0_old = group.pivot_x0.to(x0_theta.device).float()  # [G, T, ...]
    adv = advantages.to(x0_theta.device)[None].expand(len(anchors), -1)
    anchors = anchors.to(x0_theta.device)
    losses, clip_fracs, deviations = [], [], []
    for k in range(T):
        old_k = x0_old[:, k][None].expand(len(anchors), *x0_old[:, k].shape)
        stats = copo_loss_with_stats(x0_theta[:, k], old_k, anchors, adv, tau, clip_eps)
        losses.append(stats.loss)
        clip_fracs.append(float(stats.clip_fraction))
        deviations.append(float(stats.rho_max_deviation))
    return GroupLoss(torch.stack(losses).mean(), sum(clip_fracs) / T, max(deviations))


def sde_grpo_group_loss(
    policy: StreamingVideoPolicy,
    group: CandidateGroup,
    advantages: torch.Tensor,
    branches: torch.Tensor,
    clip_eps: float | None,
    eta: float,
) -> GroupLoss:
    """SDE-GRPO on one group whose branches differ in the pivot chunk's re-noise draws: the Gaussian
    log-probability of each stored transition x_k -> x_{k+1} under the current and the old x0."""
    T = group.num_steps
    if T < 2:
        raise ValueError("SDE-GRPO needs at least two denoising steps (one stochastic transition)")
    x0_theta = _replay_steps(policy, group, branches, range(T - 1)).float()  # [B, T-1, ...]
    device = x0_theta.device
    inputs = group.pivot_inputs[branches].to(device).float()  # [B, T, ...]
    x0_old = group.pivot_x0[branches].to(device).float()
    sigmas = policy.sampler.sigmas(group.timesteps.to(device)).float()
    adv = advantages.to(device)[branches.to(device)]
    losses, clip_fracs, deviations = [], [], []
    for k in range(T - 1):
        args = (inputs[:, k + 1], inputs[:, k])
        logp = sde_step_log_prob(*args, x0_theta[:, k], sigmas[k], sigmas[k + 1], eta)
        logp_old = sde_step_log_prob(*args, x0_old[:, k], sigmas[k], sigmas[k + 1], eta)
        stats = sde_grpo_loss_with_stats(logp, logp_old, adv, clip_eps if clip_eps is not None else float("inf"))
        losses.append(stats.loss)
        clip_fracs.append(float(stats.clip_fraction))
        deviations.append(float((stats.ratio_mean - 1).abs()))
    return GroupLoss(torch.stack(losses).mean(), sum(clip_fracs) / (T - 1), max(deviations))


# ---------------------------------------------------------------- Astrolabe NFT: streaming window training
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
    if group.final_latents is None:
        raise ValueError(f"group {group.group_id} has no final_latents; NFT trains on rollouts recorded with record_final_latents")
    f, num_chunks = policy.frames_per_chunk, group.num_chunks
    latents = group.final_latents[branches].to(policy.device, policy.dtype)  # [B, F, C, H, W]
    if latents.shape[1] != num_chunks * f:
        raise ValueError(f"group {group.group_id}: final_latents has {latents.shape[1]} frames, expected {num_chunks} chunks of {f}")
    if not (0 <= window.start < window.stop <= num_chunks) or len(draws) != len(window):
        raise ValueError(f"window {window} must lie in 0..{num_chunks} with one draw per chunk (got {len(draws)})")
    selective = adapters.reference is not None
    if selective and (selected is None or selected.shape != r.shape):
        raise ValueError("selective regularisation needs a bool mask `selected` over the branches")
    rows = torch.nonzero(selected).flatten() if selective else None

    text = policy.text_conditioning([group.prompt])
    shared = latents[0, : min(window.start, group.pivot) * f]  # identical in every branch before the pivot
    streams = {name: RollingContext(policy, text, switch, adapter, shared, len(branches))
               for name, adapter in (("theta", adapters.trainable), ("old", adapters.old))}
    if not selective and kl_beta > 0:
        streams["base"] = RollingContext(policy, text, switch, None, shared, len(branches))
    if selective and len(rows):
        streams["ref"] = RollingContext(policy, text, switch, adapters.reference, shared, len(rows))
    for c in range(shared.shape[0] // f, window.start):  # branch-specific chunks before the window
        for name, stream in streams.items():
            stream.append(_chunk(latents, c, f, rows if name == "ref" else None))

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


def _chunk(latents: torch.Tensor, c: int, f: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    part = latents[:, c * f : (c + 1) * f]
    return part if rows is None else part[rows]
