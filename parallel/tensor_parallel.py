"""Tensor parallelism plans (DTensor) for the Jamba model, keyed by module name."""

from __future__ import annotations

import torch.nn as nn

from parallel.dims import ParallelDims


def apply_tp(model: nn.Module, dims: ParallelDims) -> None:
    raise NotImplementedError("tensor parallelism lands next (issue 4); use parallel.tp=1 for now")
