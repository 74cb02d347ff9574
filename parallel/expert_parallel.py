"""Expert parallelism (and tensor parallelism of the experts), plus global MoE statistics.

The MoE block (jamba/moe.py) sorts token copies by expert and calls
`experts(x_sorted (N, H), num_tokens_per_expert (E,))`. `apply_experts` turns the stacked expert
weights gate_proj/up_proj (E, I, H) and down_proj (E, H, I) into DTensors on the expert mesh's
("ep", "tp") view, placements [Shard(0), Shard(1)] / [Shard(0), Shard(2)] (experts over ep,
intermediate size over tp), and wraps the experts' forward:

    1. (tp > 1) input replicated over TP: identity forward, all-reduce of its gradient
    2. (ep > 1) exchange per-expert counts (all-to-all), then the token rows themselves (all-to-all of
       variable sizes); rows arrive grouped by source rank, then by local expert
    3. re-sort the received rows by local expert; run the unmodified grouped GEMM on the local shards
    4. undo the sort, all-to-all back (the reverse exchange); (tp > 1) sum the partial outputs over TP

Host syncs and compilation: NCCL's variable all-to-all needs the split sizes on the host, so each exchange
has exactly one device-to-host copy (send and receive sizes together; the row bookkeeping after it is
told its output size and does not sync again); the backward reuses the forward's sizes. On 2 H200s that
sync is part of EP=2's 24-38 ms of device idle time per bench-3b step (8 MoE layers; docs/performance.md):
the GPU runs dry at each one and waits while Python issues the next kernels. `parallel.ep_exchange=padded`
(`_exchange_padded`) removes it: each rank sends every peer a fixed block with room for all its routed rows,
so every size is static; it moves ep x the bytes and holds about ep x the experts' activations. Measured on
2 H200s it cut the idle time by 6-11 ms but added 41-44 ms of compute (the elementwise work over all ep x N
received rows), so it is slower for bench-3b and "sized" stays the default. `parallel.ep_exchange=overlap` (parallel/ep_overlap.py)
keeps the sized exchange but runs its all-to-alls under the experts' own GEMMs; 1.5% slower on 2 H200s. The exchange and
the local grouped GEMM run outside torch.compile (`torch.compiler.disable`): their sizes change with the
routing at every step and layer; traced into the decoder layers' graphs they became symbolic shapes and
guards on split sizes, Dynamo recompiled for them, and Inductor specialises further on such sizes (the
likely cause of EP=2 stalling after step 10 on two H200s; on CPU we saw the recompilations and symbolic
shapes, not the stall). The compiled graphs now end before the experts and resume after them with the same
static shapes on every rank and step (tests/parallel/test_ep_compile.py counts the compilations).

Gradient reduction of the experts: the all-to-all backward already sums, on the rank holding an
expert, the contributions of the tokens of all ep ranks; FSDP2 then averages over the expert
data-parallel ranks ("edp" = dp_replicate x efsdp) only. The local weight views carry a gradient
scale of 1/ep, so the result is the mean over all dp_cp = edp * ep data-parallel ranks, exactly as
for the dense parameters. (FSDP2's set_gradient_divide_factor would do the same but needs
ReduceOp.PREMUL_SUM, which gloo lacks.)
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Shard

from jamba.config import ConfigError
from jamba.moe import gather_rows, inverse_permutation
from parallel.collectives import (all_reduce_sum, all_to_all_v, copy_to_group, exchange_expert_counts,
                                  expert_split_sizes, local_expert_order, reduce_from_group, scale_grad)
from parallel.dims import ParallelDims
from parallel.ep_overlap import overlap_group, overlapped_experts
from parallel.styles import distribute_param, swap_in_local, swap_out_local

logger = logging.getLogger(__name__)

EXPERT_PLACEMENTS = {"gate_proj": [Shard(0), Shard(1)], "up_proj": [Shard(0), Shard(1)],
                     "down_proj": [Shard(0), Shard(2)]}


def apply_moe_stats_reduce(model: nn.Module, dims: ParallelDims) -> None:
    """Make the load-balancing and z losses see global-batch statistics: `model.moe_stats_reduce` (applied
    by the model to the stacked per-layer sums [counts | prob sums | z sum | tokens] before forming the
    losses) becomes a differentiable sum all-reduce over every rank that sees different tokens ("dp_cp").

    Why the gradient is the single-process one: every rank r adds the same aux(S) to its loss, where
    S = sum_r s_r. The all-reduce's backward sums the D equal upstream gradients, so rank r
    back-propagates D * aux'(S) * ds_r/dtheta; FSDP averages over the D ranks, giving
    sum_r aux'(S) ds_r/dtheta = d aux(S)/dtheta. (The lm loss is a per-rank mean, so the global mean is
    matched when every rank has the same number of non-ignored labels, as with packed sequences.)
    """
    if not hasattr(model, "moe_stats_reduce"):
        logger.warning("model has no `moe_stats_reduce` hook: the load-balancing loss uses per-rank statistics")
        return
    if dims.dp_cp_size == 1:
        return
    group = dims.get_mesh("dp_cp").get_group()
    model.moe_stats_reduce = lambda stats: all_reduce_sum(stats, group)


def _exchange(x: torch.Tensor, counts: torch.Tensor, ep_group, ep: int):
    """Dispatch rows of x (sorted by global expert) to the ranks holding their experts.
    Returns (rows sorted by local expert, local counts (E_local,), state for `_combine`)."""
    # The exchange's one host sync: rows to send to / receive from each rank, in one copy.
    recv_2d, send_splits, recv_splits = expert_split_sizes(counts, ep_group, ep)  # recv_2d (ep, local experts)
    # the permutation that groups the received rows by local expert (source order kept), queued before the
    # all-to-all: after the host sync the GPU idles until the host launches something, and the all-to-all's
    # launch takes the host longer than these small kernels'
    order = local_expert_order(recv_2d, sum(recv_splits))
    inv = inverse_permutation(order)
    counts_local = recv_2d.sum(0)
    xr = all_to_all_v(x, recv_splits, send_splits, ep_group)  # (sum recv, H) by source, then local expert
    # gathers both ways (and in both backwards): index_copy / index_add were the slow part of this exchange
    return gather_rows(xr, order, inv), counts_local, (order, inv, send_splits, recv_splits)


def _combine(y: torch.Tensor, state, ep_group) -> torch.Tensor:
    order, inv, send_splits, recv_splits = state
    y_src = gather_rows(y, inv, order)  # back to (source rank, local expert) order
    return all_to_all_v(y_src, send_splits, recv_splits, ep_group)  # reverse exchange


def slot_sources(slot: torch.Tensor, size: int) -> torch.Tensor:
    """slot (N,) distinct rows of a (size, H) buffer -> src (size,): src[slot[i]] = i, and N (the index of
    a zero row appended to the N rows) where no row goes: `to_slots`'s fill as a gather."""
    return torch.full((size,), slot.numel(), dtype=slot.dtype, device=slot.device).scatter_(
        0, slot, torch.arange(slot.numel(), dtype=slot.dtype, device=slot.device))


def to_slots(x: torch.Tensor, slot: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (N, H) -> (size, H) with row i at slot[i] and zeros elsewhere (src = slot_sources(slot, size)).
    Gathers both ways, as `from_slots`, its adjoint: index_copy, and index_select's backward (an atomic
    index_add), were several times slower on GPUs (jamba.moe.inverse_permutation)."""
    return _ToSlots.apply(x, slot, src)


def from_slots(buf: torch.Tensor, slot: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """buf (size, H) -> its rows slot (N, H): `buf.index_select(0, slot)` with a gather as backward."""
    return _ToSlots.apply(buf, src, slot, True)


class _ToSlots(torch.autograd.Function):
    """to_slots (pick=False): forward gathers rows `index` (= src) of x with a zero row appended, backward
    gathers rows `back` (= slot) of the gradient. from_slots (pick=True), its adjoint: forward gathers rows
    `index` (= slot), backward gathers rows `back` (= src) of the gradient with a zero row appended."""

    @staticmethod
    def forward(ctx, x, back, index, pick: bool = False):
        ctx.save_for_backward(back)
        ctx.pick = pick
        return (x if pick else _with_zero_row(x)).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return (_with_zero_row(grad) if ctx.pick else grad).index_select(0, back), None, None, None


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1, x.shape[1])])


def _exchange_padded(x: torch.Tensor, counts: torch.Tensor, ep_group, ep: int):
    """`_exchange` without a host sync (parallel.ep_exchange=padded): every rank sends each peer a block of
    C = N rows (N = its routed rows, the most it could send one peer), its rows for that peer first, zeros
    after. All shapes are static, so the host never waits for the routing.

    x (N, H) sorted by global expert, counts (E,). Returns (rows (ep*C, H) sorted by local expert, the
    padding last; local counts (E_local,); state for `_combine_padded`). The experts treat rows beyond the
    sum of the counts as padding (zero output: jamba.moe.GroupedExperts)."""
    n, n_local, dev = x.shape[0], counts.shape[0] // ep, x.device
    recv_2d = exchange_expert_counts(counts, ep_group, ep)  # (ep source ranks, local experts)
    # where each of my rows goes: block of its destination rank, then its place among that rank's rows
    per_dest = counts.view(ep, n_local).sum(1)  # (ep,)
    dest_start = torch.cumsum(per_dest, 0) - per_dest  # (ep,) first row of each destination in x
    dest = torch.repeat_interleave(torch.arange(ep, device=dev), per_dest, output_size=n)  # (N,) no sync
    slot = dest * n + torch.arange(n, device=dev) - dest_start[dest]  # (N,) row of the send buffer
    src = slot_sources(slot, ep * n)
    send = to_slots(x, slot, src)  # (ep*C, H)
    xr = all_to_all_v(send, [n] * ep, [n] * ep, ep_group)  # (ep*C, H): block s from rank s
    # local expert of every received row (n_local for padding), then grouped by local expert, padding last
    ends = torch.cumsum(recv_2d, 1)  # (ep, E_local) end of each local expert's rows in its source's block
    pos = torch.arange(n, device=dev).expand(ep, n).contiguous()  # (ep, C)
    expert_of_row = torch.searchsorted(ends, pos, right=True).reshape(-1)  # (ep*C,) in [0, E_local]
    order = torch.argsort(expert_of_row, stable=True)
    inv = inverse_permutation(order)
    return gather_rows(xr, order, inv), recv_2d.sum(0), (order, inv, slot, src, n)  # gathers, as `_exchange`


def _combine_padded(y: torch.Tensor, state, ep_group, ep: int) -> torch.Tensor:
    order, inv, slot, src, n = state
    y_src = gather_rows(y, inv, order)  # back to (source rank, row) blocks
    back = all_to_all_v(y_src, [n] * ep, [n] * ep, ep_group)  # (ep*C, H): block d from destination rank d
    return from_slots(back, slot, src)  # (N, H) my rows, in x's order


def _recomputed(layer: nn.Module) -> bool:
    """Whether the layer's MoE block is recomputed in backward (the overlap then falls back to "sized")."""
    return bool(getattr(layer, "activation_checkpointing", False) or getattr(layer.feed_forward, "token_chunk", None))


def apply_experts(model: nn.Module, dims: ParallelDims) -> None:
    """Shard every MoE layer's experts over ("ep", "tp") of the expert mesh and wrap their forward."""
    mesh = dims.get_mesh("expert")["ep", "tp"]
    ep_group = dims.get_mesh("ep").get_group() if dims.ep > 1 else None
    tp_group = dims.get_mesh("etp").get_group() if dims.tp > 1 else None
    # under sequence parallelism the MoE input's gradient is reduce-scattered by the sequence gather
    copy_input = tp_group is not None and not dims.cfg.sequence_parallel
    ep = dims.ep
    padded = dims.cfg.ep_exchange == "padded"
    overlap = dims.cfg.ep_exchange == "overlap" and ep_group is not None
    plain_layers = []  # overlap asked for, but the layer is recomputed in backward (parallel/ep_overlap.py)
    if overlap:  # with ep_overlap_sms: a group of its own over the EP ranks, the GEMMs beside it leave SMs free
        sms = dims.cfg.ep_overlap_sms
        ov_sms = sms if dims.get_mesh("ep").device_type == "cuda" else 0
        if ov_sms:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            if ov_sms >= total:
                raise ConfigError(f"parallel.ep_overlap_sms={sms} but this GPU has {total} SMs; keep fewer for the "
                                  f"all-to-alls (e.g. 8), or 0 for none")
        moe_layers = [la for la in model.model.layers if getattr(la.feed_forward, "experts", None) is not None]
        # (every rank has the same layers, so all create the group or none does)
        ov_group = None if all(_recomputed(la) for la in moe_layers) else overlap_group(dims, sms)

    def grad_scale(path, w):  # see the module docstring: FSDP's edp mean * 1/ep = the dp_cp mean
        return scale_grad(w, 1.0 / ep)

    for layer in model.model.layers:
        experts = getattr(layer.feed_forward, "experts", None)
        if experts is None:
            continue
        for name, placements in EXPERT_PLACEMENTS.items():
            distribute_param(experts, name, mesh, placements)
        local_forward = experts.forward  # the model's grouped GEMM, bound to this module
        names = list(EXPERT_PLACEMENTS)
        recomputed = _recomputed(layer)
        if overlap and recomputed:
            plain_layers.append(layer.layer_idx)

        @torch.compiler.disable  # routing-dependent sizes stay out of the compiled graphs (module docstring)
        def forward(x, num_tokens_per_expert, _mod=experts, _fwd=local_forward,
                    _overlap=overlap and not recomputed):
            # x (N, H) sorted by global expert; num_tokens_per_expert (E,)
            if copy_input:
                x = copy_to_group(x, tp_group)
            swap_in_local(_mod, names, grad_scale)
            try:
                if ep_group is None:
                    return_y = _fwd(x, num_tokens_per_expert)
                elif _overlap:
                    return_y = overlapped_experts(_mod, x, num_tokens_per_expert, ov_group, ep, ov_sms)
                elif padded:
                    xl, counts_local, state = _exchange_padded(x, num_tokens_per_expert, ep_group, ep)
                    return_y = _combine_padded(_fwd(xl, counts_local, padded=True), state, ep_group, ep)
                else:
                    xl, counts_local, state = _exchange(x, num_tokens_per_expert, ep_group, ep)
                    return_y = _combine(_fwd(xl, counts_local), state, ep_group)
            finally:
                swap_out_local(_mod, names)
            if tp_group is not None:
                return_y = reduce_from_group(return_y, tp_group)  # (N, H) partial sums over I shards
            return return_y

        experts.forward = forward
    if plain_layers:
        logger.warning("parallel.ep_exchange=overlap: MoE layers %s are recomputed in backward "
                       "(model.activation_checkpointing or model.moe_token_chunk), so they use the plain 'sized' "
                       "exchange; the others overlap their all-to-alls with the experts", plain_layers)


def global_expert_counts(expert_counts: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Per-expert token counts for logging summed over all data-parallel ranks. The model's
    `out.expert_counts` is already global when `moe_stats_reduce` is installed (dp_cp > 1): this is for
    counts taken elsewhere (e.g. accumulated per rank over micro-batches)."""
    if dims.dp_cp_size == 1 or not dist.is_initialized():
        return expert_counts
    c = expert_counts.clone()
    dist.all_reduce(c, group=dims.get_mesh("dp_cp").get_group())
    return c
