"""GroupedExperts' math (jamba/moe.py) with its backward split into an input gradient and a weight gradient.

    forward:       g = x Wg^T,  u = x Wu^T,  s = silu(g),  h = s * u,  y = h Wd^T      (per expert's rows)
    input grad:    dh = dy Wd,  du = dh * s,  dg = silu'(g) * (dh * u),  dx = dg Wg + du Wu
    weight grad:   dWd = dy^T h,  dWg = dg^T x,  dWu = du^T x                          (summed over the rows)

Autograd computes both halves of the backward together, for each call of the experts. Expert parallelism's
overlapped exchange (parallel/ep_overlap.py) runs a layer's experts as three parts, to put GEMMs under its
all-to-alls. Through autograd, each part paid a weight-gradient GEMM over few rows, and an accumulation of
the whole weight gradient: on one H200, bench-3b's experts at ep=2 took 12.9 ms per layer as three parts
against 11.9 ms as one (launch/bench_expert_parts.py). With the split, each part's input gradient is computed on
its own, and the weight gradients once, over rows that the parts leave contiguous (`h_out`, `dg_out`, `du_out`
write a part's activations into a slice of a buffer shared with another part).

The functions record no autograd graph; they run on the tensors given (the caller casts rows and weights to one
dtype). torch._grouped_mm runs the GEMMs where it can (CUDA bf16; CPU in 16 or 32 bits when rows are whole 16 bytes);
otherwise a per-expert loop does, which reads the counts on the host (once per forward part, reused by its
backward; once per weight_grad call unless given). Tests: tests/jamba/test_experts_split.py
(against autograd through GroupedExperts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

Weights = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate (E, I, H), up (E, I, H), down (E, H, I)


@dataclass
class Saved:
    """What a part's backward needs (as autograd would save it)."""
    x: torch.Tensor       # (T, H) rows, grouped by expert
    offs: torch.Tensor    # (E,) int32 end offset of each expert's rows
    g: torch.Tensor       # (T, I) gate pre-activation
    s: torch.Tensor       # (T, I) silu(g)
    u: torch.Tensor       # (T, I) up projection
    h: Optional[torch.Tensor]  # (T, I) s * u, the down projection's input (for the weight gradient)
    ends: Optional[List[int]] = None  # offs on the host, for the per-expert loop (None: torch._grouped_mm runs)


def _grouped_ok(*ts: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if ts[0].is_cuda:
        return all(t.dtype == torch.bfloat16 for t in ts)
    # CPU: half and single precision, row strides of whole 16 bytes
    return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16)
               and t.shape[-1] * t.element_size() % 16 == 0 for t in ts)


def _host_ends(offs: torch.Tensor, *ts: torch.Tensor) -> Optional[List[int]]:
    """offs on the host if the per-expert loop will run for these tensors (one host sync), else None."""
    return None if _grouped_ok(*ts) else offs.tolist()


def _ends(offs: torch.Tensor, ends: Optional[List[int]]) -> List[int]:
    return offs.tolist() if ends is None else ends  # the loop's one host sync, unless the caller has the ends


def _rows_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, ends: Optional[List[int]] = None) -> torch.Tensor:
    """a (T, K) grouped by expert, b (E, K, N) -> (T, N): each expert's rows times its matrix."""
    if _grouped_ok(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    ends = _ends(offs, ends)
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, (s0, s1) in enumerate(zip([0] + ends[:-1], ends)):
        torch.mm(a[s0:s1], b[e], out=out[s0:s1])
    return out


def _sum_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, ends: Optional[List[int]] = None) -> torch.Tensor:
    """a (T, K), b (T, N) grouped by expert -> (E, K, N): per expert, a's rows transposed times b's rows."""
    if a.shape[0] == 0:  # no rows: zero (no host sync, and _grouped_mm's CUDA kernels want rows)
        return a.new_zeros(offs.shape[0], a.shape[1], b.shape[1])
    if _grouped_ok(a, b):
        return torch._grouped_mm(a.t(), b, offs=offs)
    ends = _ends(offs, ends)
    return torch.stack([a[s0:s1].t() @ b[s0:s1] for s0, s1 in zip([0] + ends[:-1], ends)])


def forward(x: torch.Tensor, counts: torch.Tensor, w: Weights,
            h_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Saved]:
    """x (T, H) grouped by expert, counts (E,) rows per expert -> (y (T, H), what the backward needs).
    h_out: a (T, I) tensor (e.g. a slice of a larger buffer) to hold h."""
    wg, wu, wd = w
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    if x.shape[0] == 0:  # no rows: nothing to compute (and _grouped_mm's CUDA kernels want some)
        empty = x.new_empty(0, wg.shape[1])
        return x.new_empty(0, wd.shape[1]), Saved(x, offs, empty, empty, empty, empty, [0] * offs.shape[0])
    ends = _host_ends(offs, x, wg)  # once for the part, forward and backward
    g = _rows_mm(x, wg.transpose(-2, -1), offs, ends)
    u = _rows_mm(x, wu.transpose(-2, -1), offs, ends)
    s = F.silu(g)
    h = torch.mul(s, u, out=h_out) if h_out is not None else s * u
    return _rows_mm(h, wd.transpose(-2, -1), offs, ends), Saved(x, offs, g, s, u, h, ends)


def input_grad(saved: Saved, dy: torch.Tensor, w: Weights, dg_out: Optional[torch.Tensor] = None,
               du_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (T, H) -> (dx (T, H), dg (T, I), du (T, I)); dg and du are the weight gradient's inputs, written into
    dg_out / du_out when given."""
    wg, wu, wd = w
    if saved.x.shape[0] == 0:
        return torch.zeros_like(saved.x), saved.g, saved.g
    dh = _rows_mm(dy, wd, saved.offs, saved.ends)
    du = torch.mul(dh, saved.s, out=du_out) if du_out is not None else dh * saved.s
    dh.mul_(saved.u)  # d(loss)/ds, in dh's memory
    if dg_out is not None:
        dg = torch.ops.aten.silu_backward.grad_input(dh, saved.g, grad_input=dg_out)
    else:
        dg = torch.ops.aten.silu_backward(dh, saved.g)
    dx = _rows_mm(dg, wg, saved.offs, saved.ends)
    dx.add_(_rows_mm(du, wu, saved.offs, saved.ends))
    return dx, dg, du


def weight_grad(x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor, dg: torch.Tensor, du: torch.Tensor,
                counts: torch.Tensor, ends: Optional[List[int]] = None) -> List[torch.Tensor]:
    """The weights' gradients (gate (E, I, H), up (E, I, H), down (E, H, I)) from rows grouped by expert (counts
    (E,)): the inputs x, the activations h and the output gradients dy of the forward, dg and du of input_grad.
    ends: the counts' running sums on the host, if known (spares the per-expert loop a host sync)."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    if ends is None and x.shape[0]:
        ends = _host_ends(offs, x, dg)  # once for the three
    return [_sum_mm(dg, x, offs, ends), _sum_mm(du, x, offs, ends), _sum_mm(dy, h, offs, ends)]
