"""Initialise a parallelised model (built on meta, `parallelize`d, then `to_empty`) with the model's own
`init_weights` rules.

`model.init_weights` writes plain tensors (`copy_`, RNG draws of the global shapes); the parameters of a
parallelised model are DTensors. Two modes:

- "full" (exact): every DTensor parameter is temporarily replaced by a plain tensor of its global shape,
  `model.init_weights(seed)` runs exactly as in one process, and each rank keeps its shard. The values
  are then identical to the single-process model for every layout (tests, resharding, ablations across
  layouts). Costs one unsharded fp32 copy of the model per rank during the call.
- "local" (bounded memory, for models that do not fit unsharded): `init_weights` runs on each rank's
  local shards with a rank-dependent seed (same distributions: the model's rules depend on shapes only
  through dims that are not sharded, e.g. fan-in of the depthwise conv); afterwards every mesh
  dimension on which a parameter is replicated is made consistent by a broadcast from its first rank.

"auto" picks "full" when one unsharded fp32 copy is at most `full_budget_bytes` (default 8 GiB).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

logger = logging.getLogger(__name__)


def _dtensor_slots(model: nn.Module) -> List[Tuple[nn.Module, str, DTensor]]:
    return [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if isinstance(p, DTensor)]


def _swap(slots, make) -> Dict[int, nn.Parameter]:
    """Put `make(p)` (one per distinct parameter: tied weights stay tied) into every slot."""
    repl: Dict[int, nn.Parameter] = {}
    for m, n, p in slots:
        if id(p) not in repl:
            repl[id(p)] = nn.Parameter(make(p), requires_grad=p.requires_grad)
        m._parameters[n] = repl[id(p)]
    return repl


def _restore(slots) -> None:
    for m, n, p in slots:
        m._parameters[n] = p


FULL_INIT_BYTES = 8 << 30
"""The largest fp32 model initialised whole ("full" mode here; train.sharded_init=null's threshold)."""


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, mode: str = "auto", full_budget_bytes: int = FULL_INIT_BYTES) -> str:
    """Run `model.init_weights(seed)` on a (possibly) parallelised model; returns the mode used."""
    slots = _dtensor_slots(model)
    if not slots:
        model.init_weights(seed=seed)
        return "plain"
    unique = {id(p): p for _, _, p in slots}
    full_bytes = sum(p.numel() * 4 for p in unique.values())
    if mode == "auto":
        mode = "full" if full_bytes <= full_budget_bytes else "local"
    if mode not in ("full", "local"):
        raise ValueError(f"init mode {mode!r}: use 'auto', 'full' or 'local'")
    if mode == "full":
        repl = _swap(slots, lambda p: torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device))
        try:
            model.init_weights(seed=seed)
        finally:
            _restore(slots)
        for p in unique.values():
            full = repl[id(p)].detach()
            shard = distribute_tensor(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim, src_data_rank=None)
            p.to_local().copy_(shard.redistribute(p.device_mesh, p.placements).to_local())
    else:
        rank = dist.get_rank() if dist.is_initialized() else 0
        repl = _swap(slots, lambda p: p.to_local())  # the shards themselves: written in place
        try:
            model.init_weights(seed=seed + 1000003 * rank)
        finally:
            _restore(slots)
        for p in unique.values():
            mesh, local = p.device_mesh, p.to_local()
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Replicate) and mesh.size(dim) > 1:
                    src = mesh.mesh.movedim(dim, -1).reshape(-1, mesh.size(dim))
                    row = [r for r in src.tolist() if rank in r][0]
                    dist.broadcast(local, src=row[0], group=mesh.get_group(dim))
        # plain (non-DTensor) parameters are replicated on every rank
        for p in model.parameters():
            if not isinstance(p, DTensor) and dist.is_initialized():
                dist.broadcast(p.data, src=0)
    logger.info("initialised %d sharded parameters (%.3f GB unsharded fp32) in %r mode", len(unique),
                full_bytes / 1e9, mode)
    return mode
