"""Differentiable collectives with the adjoints the parallel layers need (eager c10d, works on gloo
and NCCL). Each autograd Function states its forward and backward."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


class _AllReduceMean(torch.autograd.Function):
    """fwd: mean over the group. bwd: mean over the group of the incoming gradients.

    This is the adjoint of "every rank adds the same reduced value to its loss, and the gradients of
    all ranks are then averaged" (FSDP/DDP): see `parallel/expert_parallel.py` for the derivation."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y / dist.get_world_size(group)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g / dist.get_world_size(ctx.group), None


class _CopyToGroup(torch.autograd.Function):
    """fwd: identity (the input is replicated over the group). bwd: sum of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromGroup(torch.autograd.Function):
    """fwd: sum of the partial results of the group. bwd: identity (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

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


def all_reduce_mean(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceMean.apply(x, group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)


def all_to_all_v(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    return _AllToAllV.apply(x, out_splits, in_splits, group)
