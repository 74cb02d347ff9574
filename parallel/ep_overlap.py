"""Expert parallelism with the token all-to-alls running under the experts' GEMMs (parallel.ep_exchange=overlap).

The "sized" exchange (parallel/expert_parallel.py) sends every routed row, waits for the rows to arrive, runs the
local experts, sends the outputs back and waits again: four all-to-alls per MoE layer and step (two forward,
two backward) during which the GPU computes nothing. On 2 H200s they are ~19 ms of bench-3b's ~370 ms step.

Here the rows this rank keeps for its own experts ("self" rows: 1/ep of them on average, half with ep=2) are
split in two halves, S1 and S2, and the rows from the other ranks form one part, R:

    forward:   start dispatch(R)  | experts(S1)       (the dispatch travels while S1 computes)
               wait; experts(R); start combine(R) | experts(S2)
               wait; output in x's order
    backward:  start grad dispatch(R) | backward(S2)
               wait; backward(R); start grad return(R) | backward(S1)
               wait; input gradient in x's order

Each all-to-all has a GEMM of about its own length under it, on the compute stream, while NCCL moves the rows
on its own stream (`async_op=True`; `work.wait()` makes the compute stream, not the host, wait). Nothing else
changes: the same single host sync for the split sizes (on CUDA in bf16; the per-expert loop of other dtypes reads
each part's counts, as GroupedExperts' does), the same rows, the same experts and weights. On one H200 in bf16 the
outputs and input gradients equalled one grouped call's bit for bit, and the weight gradients up to their
summation order (two partial sums, my rows' and the received rows', instead of one; launch/bench_expert_parts.py
checks it); on CPU the GEMMs may differ (torch._grouped_mm here in fp32, GroupedExperts' per-expert loop there);
tests/parallel/test_ep_overlap.py holds float64 to 1e-12 of "sized".

Why one autograd Function with its own backward: autograd's engine orders the backward by its own rules (the most
recently created node first), which would run R's backward, waiting for its gradients, before S1's. So the
Function runs the experts' math itself (jamba/experts_split.py, GroupedExperts' SwiGLU with its backward split in
two): each part's input gradient in the order above, then the weight gradients, beside the last all-to-all. The
weight gradients run once over all my rows (S1 and S2 write their activations into one buffer of my rows) and
once over R's, then are summed: through autograd, each part paid a weight-gradient GEMM over few rows and an
accumulation of the whole gradient (on one H200, bench-3b's experts at ep=2: 12.5-13.1 ms per layer for the three
parts through autograd, 12.3-12.4 split, 11.8 as one part; launch/bench_expert_parts.py). The weights are inputs
of the Function, so their gradients reach FSDP as from any other op (also `torch.autograd.grad`, and when the rows
need no gradient, e.g. only the experts train). A second backward through the same graph is refused (the
activations are freed as the backward uses them). The own halves are one copy of my rows, so that x's storage
(mostly rows for the other ranks) is freed once they are sent. End to end on 2 H200s, before this split, the
overlap ran 1.5% slower than "sized" (docs/performance.md).

SMs for the all-to-alls (parallel.ep_overlap_sms = C > 0): the GEMMs of parts S1 and S2 run beside an all-to-all.
torch's grouped GEMM is a persistent kernel whose grid covers every SM; launched while an all-to-all's blocks hold
some, its blocks that find no free SM wait and run as a second wave, which could cost about what the overlap hides.
With C > 0 the overlap exchanges over a group of its own (`overlap_group`: the EP ranks, NCCL at most C blocks, a
high-priority stream) and those GEMMs leave C SMs free (`sm_carveout`). Measured on 2 H200s (bench-3b, docs/performance.md): the
overlap's compute did not shrink (338.9 ms per step with C = 0, 337.6 with C = 8), its all-to-alls got slower
(moving rows 10.1 -> 29.3 ms per step with C = 8), and train.py ran at the same speed (45,361 and 45,369 tokens/s
per GPU in one round), so the second wave is not what cost it its extra compute (13-17 ms per step then, before
the weight-gradient split); C = 0 stays the default.

Under activation checkpointing of the MoE layer (model.activation_checkpointing, model.moe_token_chunk) the
plain "sized" exchange is used instead (apply_experts decides per layer and says so): the Function keeps its
activations itself, out of checkpointing's reach, so the recomputation would rerun the exchanges and still hold
everything.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from jamba import experts_split as experts
from jamba.moe import inverse_permutation
from parallel.collectives import expert_split_sizes, local_expert_order


def overlap_group(dims, sms: int):
    """The process group of the overlapped exchange. sms = 0: the EP group itself. sms > 0: a group of its own over
    the same ranks (every rank creates all of them, in the expert mesh's order); on NCCL its communicator runs at
    most `sms` thread blocks (maxCTAs) on a high-priority stream, so that an all-to-all never holds more SMs than
    the GEMMs beside it leave free (`sm_carveout`), and its blocks are scheduled as soon as SMs free up."""
    ep_group = dims.get_mesh("ep").get_group()
    if sms == 0:
        return ep_group
    options = None
    if dist.get_backend(ep_group) == "nccl":
        options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        options.config.max_ctas = sms
    group, _ = dist.new_subgroups_by_enumeration(dims.ep_rank_groups(), pg_options=options,
                                                 group_desc="ep_overlap")
    mine, expected = dist.get_process_group_ranks(group), dist.get_process_group_ranks(ep_group)
    if mine != expected:  # the enumeration disagrees with the mesh: exchanging there would pair the wrong ranks
        raise RuntimeError(f"parallel.ep_overlap_sms: the overlap's group holds ranks {mine}, the EP group {expected}")
    return group


@contextlib.contextmanager
def sm_carveout(sms: int):
    """Matmuls launched inside leave `sms` SMs free (torch's SM carveout: cuBLASLt's SM count target and the
    persistent grid of torch._grouped_mm). A persistent GEMM launched beside a running all-to-all otherwise sizes
    its grid to every SM, and the blocks that find no free SM can only start when the all-to-all's end (a second
    wave; on 2 H200s keeping SMs free did not shorten the overlap's compute, see the module docstring). The setting
    is process-wide and read at launch, so it is restored at once (also on errors); CPU matmuls ignore it."""
    if not sms:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


def _start(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group, out=None):
    """Start an all-to-all of x's rows: send in_splits[r] rows to rank r, receive out_splits[r] from it (into
    `out` if given). Returns (output buffer, work); the buffer is valid after work.wait()."""
    y = out if out is not None else x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(y, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return y, work


def _without(values: Sequence[int], me: int) -> List[int]:
    """Split sizes with my own entry zeroed: my rows never travel."""
    return [0 if r == me else v for r, v in enumerate(values)]


def _split(t: torch.Tensor, splits: Sequence[int], me: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """t (sum splits, H) in rank order -> (my segment, the others' rows when they are one slice, i.e. mine come
    first or last, as always with ep=2; else None)."""
    start = sum(splits[:me])
    end = start + splits[me]
    others = t[end:] if start == 0 else t[:start] if end == t.shape[0] else None
    return t[start:end], others


def _segments(t: torch.Tensor, splits: Sequence[int], me: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """t (sum splits, H) in rank order -> (my segment, the others' rows concatenated in rank order; a view, no
    copy, when they are one slice)."""
    mine, others = _split(t, splits, me)
    if others is None:
        start = sum(splits[:me])
        others = torch.cat([t[:start], t[start + splits[me]:]])
    return mine, others


def _result(like: torch.Tensor, splits: Sequence[int], me: int):
    """A buffer (sum splits, H) in rank order for a result like `like`'s rows: (buffer, my segment, the others'
    segment when it is one slice, else None). The all-to-all then receives straight into the buffer, and my rows
    are written into theirs: no `_assemble` copy of every row."""
    out = like.new_empty((sum(splits),) + tuple(like.shape[1:]))
    return (out, *_split(out, splits, me))


def _assemble(mine: torch.Tensor, others: torch.Tensor, splits: Sequence[int], me: int) -> torch.Tensor:
    """Inverse of `_segments`: put my segment back between the others' rows."""
    before = sum(splits[:me])
    return torch.cat([others[:before], mine, others[before:]])


def _gather(t: torch.Tensor, order) -> torch.Tensor:
    """Rows by (source rank, local expert) -> by local expert (order: (permutation, its inverse), or None when
    they are so already)."""
    return t if order is None else t.index_select(0, order[0])


def _scatter(t: torch.Tensor, order) -> torch.Tensor:
    """Inverse of `_gather` (a gather by the inverse permutation: faster than index_copy)."""
    return t if order is None else t.index_select(0, order[1])


def split_counts(counts: torch.Tensor, a: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """counts (El,) of rows grouped by local expert -> the counts of the first `a` rows and of the rest (an expert's
    rows may straddle the cut), on the device: no host sync."""
    start = torch.cumsum(counts, 0) - counts
    first = (a - start).clamp(min=0).minimum(counts)
    return first, counts - first


class _OverlappedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, wg, wu, wd, group, ep: int, sms: int, grad: bool):
        """x (N, H) sorted by global expert, counts (E,) rows per global expert, the local experts' weights (in x's
        dtype) -> (N, H) expert outputs."""
        me = dist.get_rank(group)
        n_local = counts.shape[0] // ep
        w = (wg, wu, wd)
        # The one host sync, as in the "sized" exchange: rows to send to / receive from each rank.
        recv_2d, send, recv = expert_split_sizes(counts, group, ep)  # recv_2d (ep, local experts) on the device
        send_r, recv_r = _without(send, me), _without(recv, me)

        x_self, x_out = _segments(x, send, me)  # my rows for my experts; the rows for the other ranks

        # My rows, split in two halves (an expert's rows may straddle the cut; counts stay on the device), in one
        # copy (x's storage, mostly rows for the other ranks, is freed once they are sent). Both halves write their
        # activations into one buffer, so that the weight gradient runs once over all my rows.
        x_own = x_self.clone()  # the GPU's first work after the host sync
        del x_self
        s = send[me]
        a = s // 2
        c_self = counts.view(ep, n_local)[me]
        c1, c2 = split_counts(c_self, a)  # (El,) each
        h_own = x.new_empty(s, wg.shape[1])
        # The copy and the counts above are queued before the dispatch: after the host sync the GPU idles until
        # the host launches something, and the all-to-all's launch takes the host longer than these kernels'.
        # S1's GEMMs come after it, so that the all-to-all's blocks are resident before the GEMMs' persistent
        # grids take every SM (queued the other way round, the dispatch could wait for SMs until S1 ended).
        xr_src, dispatch = _start(x_out, recv_r, send_r, group)  # by source rank, then local expert
        with sm_carveout(sms):  # beside the dispatch
            y1, p1 = experts.forward(x_own[:a], c1, w, h_out=h_own[:a])

        dispatch.wait()
        others = torch.cat([recv_2d[:me], recv_2d[me + 1:]])  # (ep-1, El) rows each other rank sends me
        # group the received rows by local expert; from one other rank (ep=2) they arrive grouped already
        order = None
        if ep > 2:
            perm = local_expert_order(others, sum(recv_r))
            order = (perm, inverse_permutation(perm))
        c_r = others.sum(0)
        yr, pr = experts.forward(_gather(xr_src, order), c_r, w)
        yr_src = _scatter(yr, order)  # back to (source, local expert) order
        out, out_mine, out_others = _result(yr, send, me)
        y_out, combine = _start(yr_src, send_r, recv_r, group, out=out_others)

        with sm_carveout(sms):  # beside the combine
            y2, p2 = experts.forward(x_own[a:], c2, w, h_out=h_own[a:])
        combine.wait()
        if out_others is not None:
            torch.cat([y1, y2], out=out_mine)
        else:  # ep > 2 with my rows in the middle
            out = _assemble(torch.cat([y1, y2]), y_out, send, me)

        if grad and not any(ctx.needs_input_grad[2:5]):  # frozen experts: no weight gradient, no h to keep
            p1.h = pr.h = p2.h = h_own = None
        ctx.parts = (p1, pr, p2, x_own, h_own, c_self, c_r, w) if grad else None
        ctx.state = (order, send, recv, send_r, recv_r, me, a, group, sms)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.parts is None:
            raise RuntimeError("parallel.ep_exchange=overlap: the experts' saved activations of this MoE layer were "
                               "already used by a backward (retain_graph and a second backward are not supported); "
                               "use parallel.ep_exchange=sized")
        p1, pr, p2, x_own, h_own, c_self, c_r, w = ctx.parts
        order, send, recv, send_r, recv_r, me, a, group, sms = ctx.state
        ctx.parts = None  # the activations are freed as they are used
        g_self, g_out = _segments(g.contiguous(), send, me)
        g_src, grad_dispatch = _start(g_out, recv_r, send_r, group)  # the outputs' gradients to the experts
        # dg, du of my rows, in one buffer each for the weight gradient (frozen experts: none)
        dg_own, du_own = (x_own.new_empty(x_own.shape[0], w[0].shape[1]) if h_own is not None else None
                          for _ in range(2))
        own = lambda t, part: None if t is None else t[part]  # noqa: E731 - a half of a buffer, or None
        with sm_carveout(sms):
            d2, _, _ = experts.input_grad(p2, g_self[a:], w, dg_out=own(dg_own, slice(a, None)),
                                          du_out=own(du_own, slice(a, None)))
        del p2
        grad_dispatch.wait()
        g_r = _gather(g_src, order)
        dr, dg_r, du_r = experts.input_grad(pr, g_r, w)
        xr, hr, ends_r = pr.x, pr.h, pr.ends
        del pr  # its g, s, u
        dr_src = _scatter(dr, order)
        dx, dx_mine, dx_others = _result(dr, send, me)
        d_out, grad_return = _start(dr_src, send_r, recv_r, group, out=dx_others)  # the inputs' grads to their sources
        with sm_carveout(sms):  # beside the return: my first half's input gradient, then every weight gradient
            d1, _, _ = experts.input_grad(p1, g_self[:a], w, dg_out=own(dg_own, slice(a)),
                                          du_out=own(du_own, slice(a)))
            del p1
            dw = None
            if h_own is not None:  # the experts need weight gradients
                dw = experts.weight_grad(x_own, h_own, g_self, dg_own, du_own, c_self)  # all my rows at once
                for acc, t in zip(dw, experts.weight_grad(xr, hr, g_r, dg_r, du_r, c_r, ends_r)):
                    acc.add_(t)
        grad_return.wait()
        if dx_others is not None:
            torch.cat([d1, d2], out=dx_mine)
        else:
            dx = _assemble(torch.cat([d1, d2]), d_out, send, me)
        dw = [None] * 3 if dw is None else [t if need else None for t, need in zip(dw, ctx.needs_input_grad[2:5])]
        return (dx, None, *dw, None, None, None, None)


def overlapped_experts(mod, x: torch.Tensor, counts: torch.Tensor, group, ep: int, sms: int = 0) -> torch.Tensor:
    """Expert-parallel experts with the all-to-alls under the GEMMs (module docstring).
    mod: the layer's GroupedExperts, its weights already swapped to local views; x (N, H) rows sorted by global
    expert; counts (E,) rows per global expert; sms: SMs the GEMMs beside an all-to-all leave free
    (`sm_carveout`; 0: none). Returns (N, H) in x's order."""
    # the dtype GroupedExperts computes in: autocast's for the rows and the weights, if on; else the rows'
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = [p.to(x.dtype) for p in (mod.gate_proj, mod.up_proj, mod.down_proj)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x] + w)  # else keep no activations
    return _OverlappedExperts.apply(x, counts, *w, group, ep, sms, grad)
