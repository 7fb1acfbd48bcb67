"""The learner group's collective: one `torch.distributed` process group over the learner ranks (NCCL
when the policy is on a GPU, gloo on CPUs), and the gradient sum before each optimiser step.

Rendezvous is rank 0's node address and a port free there (both found inside rank 0's actor), handed to
the other ranks through their `join_group` Ray call: the TCP rendezvous Ray Train's own process-group
setup uses. Ray Train itself is not used: its `TorchTrainer` owns the training loop (a function run in its
workers, with its own checkpointing and failure policy), while the learner's loop is the driver's typed
calls with the exactly-once acks and checkpoint format of `learner.learner_actor`, and its process-group
helper is private API.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waits this long for a rank that is alive but late; a rank whose process is gone is noticed
# at once (gloo closes its sockets, NCCL's watchdog aborts).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class RankLost(RuntimeError):
    """A collective failed: another learner rank died (or stayed away past COLLECTIVE_TIMEOUT)."""


def free_port() -> int:
    """A TCP port free on this node now (the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_process_group(address: str, port: int, rank: int, world_size: int, device: torch.device) -> None:
    """Join the learner group's process group; returns when every rank has joined."""
    dist.init_process_group(backend_for(device), init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


def sum_gradients(params: list[torch.Tensor], loss_share: float) -> float:
    """Sum every rank's gradients of `params` (in place, in one collective) and their loss shares; returns
    the summed loss. Each rank back-propagated its groups' losses scaled by 1 / (the iteration's groups), so
    the sum is the gradient one learner accumulates over all the groups. A parameter without a gradient
    (a rank without groups) counts as zeros; a NaN on any rank reaches every rank, so the non-finite guard
    takes the same verdict everywhere."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    loss = torch.tensor([loss_share], dtype=torch.float64, device=flat.device)
    try:
        dist.all_reduce(flat)
        dist.all_reduce(loss)
    except RuntimeError as err:  # gloo's "connection closed by peer", NCCL's DistBackendError, a timeout
        raise RankLost(f"a learner rank was lost during the gradient sum: {err}") from err
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p)
        offset += g.numel()
    return float(loss)
