"""The learner group's gradient sum (`learner.distributed.sum_gradients`) on a real 2-process gloo group:
the ranks end with the sum of their gradients and loss shares (a rank without a gradient counts as zeros),
and a non-finite gradient on one rank makes every rank's `NonFiniteGuard` skip the same step."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from learner.distributed import free_port, join_process_group, sum_gradients
from learner.nonfinite_guard import NonFiniteGuard


def _rank(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    join_process_group("127.0.0.1", port, rank, 2, torch.device("cpu"))
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    optimizer = torch.optim.SGD(params, lr=0.5)
    guard = NonFiniteGuard(max_in_row=3)
    # Step 1: rank 0 has gradients of the first parameter only, rank 1 of both.
    params[0].grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    if rank == 1:
        params[1].grad = torch.full((2, 2), 4.0)
    loss = sum_gradients(params, 0.25 * (rank + 1))
    grads = [p.grad.tolist() for p in params]  # plain lists: a tensor's storage would not outlive this process
    stepped_first = guard.step(optimizer, params, loss, 1e9, [f"g{rank}"])[0]
    # Step 2: a NaN on rank 1 only.
    optimizer.zero_grad(set_to_none=True)
    params[0].grad = torch.full((3,), float("nan") if rank == 1 else 1.0)
    before = [p.detach().clone() for p in params]
    stepped_second = guard.step(optimizer, params, sum_gradients(params, 0.1), 1e9, [f"g{rank}"])[0]
    unchanged = all(torch.equal(b, p.detach()) for b, p in zip(before, params))
    results.put((rank, loss, grads, stepped_first, stepped_second, unchanged, guard.in_row))


def test_ranks_sum_gradients_and_agree_to_skip_a_non_finite_step():
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, loss, grads, stepped_first, stepped_second, unchanged, in_row in out:
        assert loss == 0.25 + 0.5
        assert grads == [[3.0, 6.0, 9.0], [[4.0, 4.0], [4.0, 4.0]]]
        assert stepped_first and not stepped_second and unchanged and in_row == 1, rank
