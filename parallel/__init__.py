"""Parallelism for an unmodified `jamba` model: one validated device mesh, FSDP2 data parallelism,
DTensor tensor parallelism, expert parallelism and reshardable distributed checkpoints.

    dims = ParallelDims(ParallelConfig(**cfg.parallel), world_size, model=model_cfg, seq_len=L)
    dims.build_mesh("cuda")
    model = parallelize(model, dims)        # in place (works on a meta-device model); returns it
    model.to_empty(device=device)
    init_weights(model, seed)               # the model's init rules, same values for every layout
    loader = build_dataloader(..., dp_rank=dims.dp_rank, dp_world_size=dims.dp_size)
"""

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.init import init_weights
from parallel.parallelize import parallelize

__all__ = ["ParallelConfig", "ParallelDims", "parallelize", "init_weights"]
