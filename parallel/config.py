"""Typed schema of the `parallel` config group (conf/parallel/*.yaml).

One `ParallelConfig` describes how the world of processes is carved into a device mesh. The
degrees multiply to the world size: dp_replicate * dp_shard * cp * tp = WORLD_SIZE. Expert
parallelism does not add ranks: `ep` is carved out of the dp_shard * cp ranks (experts are sharded
over `ep`, and their FSDP runs over the remaining dp_shard * cp / ep "expert data parallel" ranks).
`ParallelDims` (parallel/dims.py) validates all of it against the world size and the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jamba.config import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
EP_EXCHANGES = ("sized", "padded", "overlap")


@dataclass
class ParallelConfig:
    """Parallel layout and numerics. Every field can be set from the CLI: `parallel.tp=2`."""

    dp_replicate: int = 1
    """Replicated data parallelism (DDP-like; the outer axis of HSDP: replicate across nodes).
    -1 = fill (only when dp_shard is not -1)."""
    dp_shard: int = -1
    """Sharded data parallelism (FSDP2). -1 = fill: WORLD_SIZE / (dp_replicate * cp * tp)."""
    tp: int = 1
    """Tensor parallelism: attention by heads, MLP/experts by intermediate size, Mamba by d_inner,
    embedding and lm_head by vocabulary. Keep it within a node (NVLink)."""
    ep: int = 1
    """Expert parallelism: each EP rank holds num_experts / ep experts. Must divide dp_shard * cp
    (ep borrows data-parallel ranks; tokens are exchanged by all-to-all)."""
    ep_exchange: str = "sized"
    """How EP ranks exchange token rows. "sized": an all-to-all of exactly the routed rows; NCCL needs the split
    sizes on the host, so each exchange (one per MoE layer and forward) synchronises the host with the GPU
    once. "padded": every rank sends each EP peer a buffer with room for all its N routed rows (the most it
    could send one peer), so sizes are static and nothing waits on the host; exact (dropless) like "sized",
    at ep x the bytes on the wire and about ep x the experts' activation memory. Slower than "sized" for
    bench-3b on 2 H200s (84-87% against 91-95% of FSDP's tokens/s; parallel/expert_parallel.py, docs/performance.md).
    "overlap": the "sized" exchange with the all-to-alls running under the experts' own GEMMs (this rank's rows
    for its own experts are computed while the others' rows travel; parallel/ep_overlap.py); same rows, same
    host sync. MoE layers under activation checkpointing fall back to "sized". It measured 1.5% slower than
    "sized" on 2 H200s before its weight gradients were computed once per kind of rows and "sized" reordered
    with gathers; without the wire (one H200, launch/bench_ep_layer.py) it now costs a rank 0.2 ms per bench-3b
    MoE layer more than "sized", and hides most of the wire. Measured since on 2 H200s (bench-3b, compiled,
    expert biases 0.01, medians of two rounds): both 95.5% of one GPU's tokens/s per GPU, so "sized" stays the
    default."""
    ep_overlap_sms: int = 0
    """With ep_exchange=overlap: streaming multiprocessors kept for the all-to-alls that run under the experts'
    GEMMs. The overlap then exchanges over a process group of its own (the same ranks as the EP group) whose NCCL
    communicator uses at most this many thread blocks (NCCL maxCTAs) on a high-priority stream, and the GEMMs that
    run beside an all-to-all leave this many SMs free (torch's SM carveout, CUDA only), so that a persistent GEMM
    never runs its last blocks as a second wave behind the all-to-all's. 0 (default): NCCL's own number of blocks
    on the EP group, no carveout. On 2 H200s over NVLink 8 and 16 gave no gain for bench-3b
    (docs/performance.md); it is meant for links where the all-to-alls take longer, where it is not measured."""
    cp: int = 1
    """Context parallelism: each sequence is split into cp contiguous chunks, one per rank, in every layer
    (Mamba-1 by a sequence <-> channel all-to-all, Mamba-2 by heads, attention by Ulysses heads;
    parallel/context_parallel.py). cp ranks read the same rows; FSDP shards parameters over dp_shard x cp.
    Every sequence length (each curriculum stage) must be divisible by cp; Mamba-1's d_inner by tp * cp;
    Mamba-2's head count by cp, with cp dividing its B/C groups or they dividing cp."""
    sequence_parallel: bool = False
    """With tp > 1: keep the residual stream and the norm regions sharded on the sequence over the TP
    group (activation memory / tp there; needs seq_len % tp == 0). See parallel/sequence_parallel.py."""
    param_dtype: str = "auto"
    """Dtype of the unsharded parameters used in forward/backward (FSDP2 MixedPrecisionPolicy).
    auto = bfloat16 on GPU; on CPU the parameters' own dtype, uncast (float32 for train.py's models). Master
    weights and optimizer state stay float32."""
    reduce_dtype: str = "auto"
    """Dtype of gradient reduce-scatter / all-reduce. auto = float32."""
    reshard_after_forward: Optional[bool] = None
    """FSDP2: free unsharded parameters after forward (ZeRO-3 style). None = True for decoder layers
    and False for the root module (its parameters are needed again right at the start of backward)."""
    fsdp_lm_head_unit: bool = True
    """FSDP2: give an untied lm_head its own unit, so that its gradient's reduce-scatter overlaps the layers'
    backward instead of waiting, exposed, at the end of backward with the root's (embedding, final norm)."""

    def __post_init__(self) -> None:
        # Shape checks that do not need the world size or the model (those live in ParallelDims).
        for name in ("tp", "ep", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} must be a positive integer")
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or (value < 1 and value != -1):
                raise ConfigError(f"parallel.{name}={value!r} must be a positive integer or -1 (fill)")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ConfigError("parallel.dp_replicate and parallel.dp_shard cannot both be -1 (fill); set one")
        if not isinstance(self.ep_overlap_sms, int) or isinstance(self.ep_overlap_sms, bool) \
                or self.ep_overlap_sms < 0:
            raise ConfigError(f"parallel.ep_overlap_sms={self.ep_overlap_sms!r} must be an integer >= 0 "
                              "(0: no SMs kept for the overlapped all-to-alls)")
        if self.ep_exchange not in EP_EXCHANGES:
            raise ConfigError(f"parallel.ep_exchange={self.ep_exchange!r} must be one of {list(EP_EXCHANGES)}")
        if self.ep_overlap_sms and self.ep_exchange != "overlap":
            raise ConfigError(f"parallel.ep_overlap_sms={self.ep_overlap_sms} applies only to "
                              f"parallel.ep_exchange=overlap (here {self.ep_exchange!r}); set it to 0 or use overlap")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ConfigError(f"parallel.{name}={value!r} must be one of {list(DTYPES)}")
