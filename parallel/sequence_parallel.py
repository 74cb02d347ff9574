"""Sequence parallelism (with tp > 1): the residual stream and the norm regions (input_layernorm,
pre_ff_layernorm, final_layernorm, the embedding output) hold L / tp tokens per TP rank, which cuts
their activation memory by tp. Each mixer / FFN gathers the sequence on entry (all-gather forward,
reduce-scatter of the partial input gradients backward) and scatters it on exit (reduce-scatter
forward of the row-parallel output, all-gather backward), as in Megatron-LM's sequence parallelism:
the same communication volume as plain TP (an all-reduce = reduce-scatter + all-gather).

    embed_tokens              vocab-parallel, output reduce-scattered on the sequence: (B, L/tp, H)
    norms                     local tokens; their weight gradient is summed over the TP group
    mamba / self_attn / MLP   input gathered as a Replicate DTensor (column-wise projections consume it);
                              output projection row-wise with output Shard(1)
    MoE                       input gathered to a plain tensor whose gradient is treated as partial
                              (the router's identical per-rank gradient is scaled by 1/tp); the experts'
                              output is all-reduced (the router weights need the full expert outputs),
                              then each rank keeps its sequence chunk
    loss                      hidden states gathered; vocab-parallel CE leaves d hidden partial, the
                              gather's backward reduce-scatters it
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from parallel.collectives import copy_to_group, scale_grad


def gather_seq(x: torch.Tensor, mesh, as_dtensor: bool):
    """(B, L/tp, ...) local -> the full sequence. Backward: reduce-scatter of partial gradients."""
    full = DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])
    return full if as_dtensor else full.to_local(grad_placements=[Partial()])


class _ScatterSeq(torch.autograd.Function):
    """fwd: keep this rank's chunk of a replicated (B, L, ...) tensor. bwd: all-gather the chunks."""

    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return x.chunk(mesh.size(), dim=1)[mesh.get_local_rank()].contiguous()

    @staticmethod
    def backward(ctx, g):
        full = DTensor.from_local(g.contiguous(), ctx.mesh, [Shard(1)], run_check=False).full_tensor()
        return full, None


def scatter_seq(x: torch.Tensor, mesh) -> torch.Tensor:
    return _ScatterSeq.apply(x, mesh)


class GatherSeqInput(ParallelStyle):
    """Gather the sequence of the module's first positional input (a plain local shard)."""

    def __init__(self, as_dtensor: bool):
        super().__init__()
        self.as_dtensor = as_dtensor

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def pre_hook(mod, args):
            return (gather_seq(args[0], device_mesh, self.as_dtensor),) + tuple(args[1:])

        module.register_forward_pre_hook(pre_hook)
        return module


class ScatterSeqOutput(ParallelStyle):
    """Keep this rank's sequence chunk of a replicated output (first element when it is a tuple)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (scatter_seq(out[0], device_mesh),) + tuple(out[1:])
            return scatter_seq(out, device_mesh)

        module.register_forward_hook(hook)
        return module


class ScaleInputGrad(ParallelStyle):
    """Scale the gradient of the first input (a replicated module whose input gradient is summed)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.register_forward_pre_hook(lambda mod, args: (scale_grad(args[0], self.scale),) + tuple(args[1:]))
        return module


class SumWeightGrad(ParallelStyle):
    """A replicated module (a norm) applied to local tokens: its weight gradient is a partial sum per rank,
    so the weight enters the forward through an identity whose backward all-reduces over the TP group."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        group = device_mesh.get_group()
        names = [n for n, p in module.named_parameters(recurse=False)]

        def pre_hook(mod, args):
            for n in names:
                mod.__dict__[n] = copy_to_group(mod._parameters[n], group)

        def post_hook(mod, args, out):
            for n in names:
                mod.__dict__.pop(n, None)

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(post_hook, always_call=True)
        return module
