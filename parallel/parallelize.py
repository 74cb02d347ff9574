"""Apply parallelism to an unmodified `JambaForCausalLM`, in a fixed order:

    1. tensor parallelism (DTensor plans keyed by module name)     parallel/tensor_parallel.py
    2. context parallelism (sequence over "cp"; wraps the mixers'   parallel/context_parallel.py
       seams after TP so its channel / head slices are of TP's local shards)
    3. expert parallelism (experts sharded over "ep", all-to-all)   parallel/expert_parallel.py
    4. FSDP2 `fully_shard`: each decoder layer, the (untied) lm_head, then the root (HSDP when
       dp_replicate > 1); expert parameters are sharded over the expert-data-parallel ranks only.

Works on a model built on the meta device (then `to_empty` + `init_weights` after this call).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from parallel.dims import ParallelDims
from parallel.expert_parallel import apply_experts, apply_moe_stats_reduce

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtypes(dims: ParallelDims, device_type: str):
    """(param_dtype, reduce_dtype): "auto" = bf16 params + fp32 reduce on GPU; on CPU the parameters' own
    dtype (None: no cast, so a float64 model, as the equivalence tests use, stays float64)."""
    c = dims.cfg
    if device_type == "cuda":
        param = _DTYPES.get(c.param_dtype) or torch.bfloat16
        reduce = _DTYPES.get(c.reduce_dtype) or torch.float32
    else:
        param, reduce = _DTYPES.get(c.param_dtype), _DTYPES.get(c.reduce_dtype)
    return param, reduce


def _decoder_layers(model: nn.Module):
    return list(model.model.layers)


def apply_fsdp(model: nn.Module, dims: ParallelDims, device_type: str) -> None:
    """FSDP2 per decoder layer, the untied lm_head (parallel.fsdp_lm_head_unit) and the root. Experts (when
    EP or TP is on) get their own FSDP unit over "edp"."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    param_dtype, reduce_dtype = resolve_dtypes(dims, device_type)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if dims.dp_replicate > 1:  # HSDP: replicate across dp_replicate, shard over dp_shard x cp
        dp_mesh = dims.get_mesh("dense")["dp_replicate", "dp_shard_cp"]
        edp_mesh = dims.get_mesh("expert")["dp_replicate", "efsdp"]
    else:
        dp_mesh = dims.get_mesh("dp_shard_cp")
        edp_mesh = dims.get_mesh("efsdp")
    reshard = dims.cfg.reshard_after_forward
    layer_reshard = True if reshard is None else reshard
    for layer in _decoder_layers(model):
        experts = getattr(getattr(layer, "feed_forward", None), "experts", None)
        if experts is not None and (dims.ep_enabled or dims.tp_enabled):
            fully_shard(experts, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=layer_reshard)
            # FSDP averages expert gradients over the edp ranks only; the 1/ep that makes this the mean
            # over all data-parallel ranks is applied in the experts' forward (parallel/expert_parallel.py).
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=layer_reshard)
    if dims.cfg.fsdp_lm_head_unit and not model.config.tie_word_embeddings:
        # The loss computes lm_head's gradient first in backward; in the root unit its reduce-scatter would
        # wait for the embedding's at the very end of backward, exposed. In its own unit it is reduce-scattered
        # while the layers' backward runs. Kept unsharded from forward to backward: backward starts with it.
        fully_shard(model.lm_head, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
        register_fsdp_forward_method(model.lm_head, "loss")  # the training path calls lm_head.loss, not forward
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=bool(reshard))


def parallelize(model: nn.Module, dims: ParallelDims, device_type: Optional[str] = None) -> nn.Module:
    """Apply TP, CP, EP and FSDP2 to `model` in place according to `dims` (mesh must be built)."""
    device_type = device_type or dims.get_mesh("dense").device_type
    if dims.tp_enabled:
        from parallel.tensor_parallel import apply_tp
        apply_tp(model, dims)
    if dims.cp > 1:
        from parallel.context_parallel import apply_cp
        apply_cp(model, dims)
    if dims.ep_enabled or dims.tp_enabled:
        apply_experts(model, dims)
    apply_moe_stats_reduce(model, dims)
    if dims.world_size > 1:
        # also with a data-parallel degree of 1 (e.g. tp only): every parameter then is a DTensor (foreach
        # optimizers and clipping cannot mix DTensors with plain tensors) and gets the mixed-precision policy
        apply_fsdp(model, dims, device_type)
    logger.info("parallelized model: %s", dims)
    return model
