"""Parallelism for an unmodified `jamba` model: one validated device mesh, FSDP2 data parallelism,
DTensor tensor parallelism, expert parallelism and reshardable distributed checkpoints.

    dims = ParallelDims(ParallelConfig(**cfg.parallel), world_size, model=model_cfg, seq_len=L)
    dims.build_mesh("cuda")
    model = parallelize(model, dims)        # in place (works on a meta-device model); returns it
    model.to_empty(device=device)
    init_weights(model, seed)               # the model's init rules, same values for every layout
    loader = build_dataloader(..., dp_rank=dims.dp_rank, dp_world_size=dims.dp_size)
"""

from jamba.lazy import lazy_exports

# Imported lazily: `parallel.config` (the schema) must load without torch, so that a config typo is
# reported in a fraction of a second (trainer/preflight.py); the rest needs torch.distributed.
_EXPORTS = {"ParallelConfig": "parallel.config", "ParallelDims": "parallel.dims",
            "parallelize": "parallel.parallelize", "init_weights": "parallel.init"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
