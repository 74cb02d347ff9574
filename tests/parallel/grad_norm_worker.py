"""torchrun worker for tests/parallel/test_grad_norm.py: trainer.loop.clip_grad_norm when a sharded parameter has a
gradient on one rank and none on the other (gloo, 2 ranks, float64).

Two meshes over the same two ranks, as the dense and the expert parameters have: `a` (Shard(0) on the first)
has a gradient everywhere, `b` (Shard(0) on the second) only on rank 0. Every rank saves its norm; rank 0 saves
the list and the norm of the full gradients for comparison.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torchrun_worker import finish_worker, init_worker

from trainer.loop import clip_grad_norm


def main(argv):
    args, _ = init_worker(argv)
    rank = dist.get_rank()
    dense, expert = init_device_mesh("cpu", (2,)), init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    full_a, full_b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    grad_a, grad_b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    a = torch.nn.Parameter(distribute_tensor(full_a, dense, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(full_b, expert, [Shard(0)]))
    a.grad = distribute_tensor(grad_a, dense, [Shard(0)])
    if rank == 0:
        b.grad = distribute_tensor(grad_b, expert, [Shard(0)])
    else:  # what each rank computes locally of b's gradient: rank 1's half is missing (counts as zeros)
        distribute_tensor(grad_b, expert, [Shard(0)])  # (the same collectives as rank 0's line above)
    norm = float(clip_grad_norm([a, b], 0.0))
    expected = torch.cat([grad_a.flatten(), grad_b[:3].flatten()]).norm().item()  # rank 0's half of b only
    every = [None, None]
    dist.all_gather_object(every, norm)
    finish_worker({"norms": every, "expected": expected}, args["out"])


if __name__ == "__main__":
    from trainer.distributed import exit_now

    main(sys.argv[1:])
    exit_now(0)  # results written: skip the finalization where gloo occasionally aborts (exit_process says why)
