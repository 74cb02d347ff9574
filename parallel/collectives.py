"""Differentiable collectives with the adjoints the parallel layers need (eager c10d, works on gloo
and NCCL). Each autograd Function states its forward and backward."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def _summed(t: torch.Tensor, group) -> torch.Tensor:
    """A fresh tensor holding the sum of `t` over the group (never all-reduces autograd's buffers in place)."""
    t = t.contiguous().clone()
    dist.all_reduce(t, group=group)
    return t


class _AllReduceSum(torch.autograd.Function):
    """fwd: sum over the group. bwd: sum over the group of the incoming gradients.

    The adjoint of "every rank adds the same function of the global sum to its loss": the gradient
    w.r.t. each rank's contribution is the sum of all ranks' upstream gradients (see
    parallel/expert_parallel.py for why this matches the single-process gradient after FSDP's mean)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _summed(x, group)

    @staticmethod
    def backward(ctx, g):
        return _summed(g, ctx.group), None


class _CopyToGroup(torch.autograd.Function):
    """fwd: identity (the input is replicated over the group). bwd: sum of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _summed(g, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """fwd: sum of the partial results of the group. bwd: identity (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return _summed(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllToAllV(torch.autograd.Function):
    """Variable-size all-to-all along dim 0. fwd: send `in_splits[r]` rows to rank r, receive
    `out_splits[r]` rows from rank r. bwd: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: List[int], in_splits: List[int], group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        x = x.contiguous()
        y = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(y, x, out_splits, in_splits, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dx = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(dx, g, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return dx, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """fwd: identity. bwd: gradient times a constant."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)


def all_to_all_v(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    return _AllToAllV.apply(x, out_splits, in_splits, group)


# ---- expert parallelism's split sizes (parallel/expert_parallel.py, parallel/ep_overlap.py) -------------------
def exchange_expert_counts(counts: torch.Tensor, group, ep: int) -> torch.Tensor:
    """counts (E,) rows this rank sends to each global expert -> (ep source ranks, E_local) rows each rank sends
    to my local experts; device to device (no host copy)."""
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)  # recv[r*El + j]: rows rank r sends to my expert j
    return recv.view(ep, counts.shape[0] // ep)


def expert_split_sizes(counts: torch.Tensor, group, ep: int):
    """The counts exchange plus its one host sync: (recv_2d (ep, E_local) on the device, rows I send to each
    rank, rows I receive from each rank), the sizes read in one device-to-host copy."""
    recv_2d = exchange_expert_counts(counts, group, ep)
    splits: List[int] = torch.cat([counts.view(ep, recv_2d.shape[1]).sum(1), recv_2d.sum(1)]).tolist()
    return recv_2d, splits[:ep], splits[ep:]


def local_expert_order(recv_2d: torch.Tensor, rows: int) -> torch.Tensor:
    """recv_2d (sources, E_local): rows received from each source, each source's grouped by local expert ->
    the permutation (rows,) that groups all of them by local expert, source order kept. `rows` is the sum of
    recv_2d, known on the host: given as the output size, it spares a second host sync."""
    n_src, n_local = recv_2d.shape
    expert_of_row = torch.repeat_interleave(
        torch.arange(n_local, device=recv_2d.device).repeat(n_src), recv_2d.reshape(-1), output_size=rows)
    return torch.argsort(expert_of_row, stable=True)
