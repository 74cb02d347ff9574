"""Expert parallelism for the MoE layers, and global MoE statistics for the load-balancing loss."""

from __future__ import annotations

import logging

import torch.nn as nn

from parallel.collectives import all_reduce_mean
from parallel.dims import ParallelDims

logger = logging.getLogger(__name__)


def apply_moe_stats_reduce(model: nn.Module, dims: ParallelDims) -> None:
    """Make the load-balancing loss see global statistics: `model.moe_stats_reduce` (called by the
    model on its per-expert statistics before forming the aux loss) becomes a differentiable mean over
    every rank that sees different tokens (the "dp_cp" mesh).

    Why the gradient is right: every rank r adds the same aux(P) to its loss, where P = mean_r P_r.
    FSDP then averages gradients over the D ranks. The backward of the mean is the mean of the
    incoming gradients (all equal to dAux/dP), so rank r back-propagates dAux/dP * dP_r/dtheta, and
    the average over ranks is dAux/dP * mean_r dP_r/dtheta = d aux(P)/dtheta: the single-process
    gradient on the global batch (with equal token counts per rank).
    """
    if not hasattr(model, "moe_stats_reduce"):
        logger.warning("model has no `moe_stats_reduce` hook: the load-balancing loss uses per-rank statistics")
        return
    if dims.dp_cp_size == 1:
        return
    group = dims.get_mesh("dp_cp").get_group()
    model.moe_stats_reduce = lambda stats: all_reduce_mean(stats, group)


def apply_ep(model: nn.Module, dims: ParallelDims) -> None:
    raise NotImplementedError("expert parallelism lands next (issue 4); use parallel.ep=1 for now")
