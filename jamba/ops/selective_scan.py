"""Mamba-1 selective scan: a chunked pure-PyTorch reference and a naive sequential loop (for tests).

Both follow mamba-ssm's `selective_scan_fn` contract. With per-step decay a_t = exp(delta_t * A) and
input b_t = delta_t * B_t * u_t (per channel d and state n):

    h_t = a_t * h_{t-1} + b_t,      y_t = sum_n C_t[n] * h_t[n] + D * u_t,      out = y * silu(z)

The reference computes the states with `_scan`, a chunked two-level scan: L is cut into nC chunks
of T ~ sqrt(L / 2) steps; pass 1 runs the T steps of all chunks at once from a zero state to get each
chunk's end state and total decay; a loop over the nC chunks carries the true incoming states; pass 2
reruns the T steps of all chunks from their incoming states, writing every state. So the Python loop
count is ~2T + nC ~ 3 sqrt(L / 2) (48 at L = 512), not L. Only products of decays <= 1 are formed
(no exp(-cumsum) trick that overflows for long chunks or large dt): as stable as the sequential loop.
Forward and backward are one autograd.Function with hand-written gradients (the backward is the same
scan run in reverse on the state gradient), so fwd+bwd costs ~25 passes over the (L, B, D, N) states
instead of an autograd graph over every step. Memory: the states, O(B * D * L * N), like the sequential loop; never O(L^2).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F


def kernel_operands(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """The dtypes the CUDA scans want (mamba-ssm's and ours): delta, B, C, z in u's dtype; A, D, delta_bias
    fp32. Under autocast the projections come out in the autocast dtype while the norms may return fp32."""
    act = u.dtype
    return (u, delta.to(act), A.float(), B.to(act), C.to(act), D.float() if D is not None else None,
            z.to(act) if z is not None else None, delta_bias.float() if delta_bias is not None else None)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"selective_scan_ref: B and C must be (batch, d_state, seqlen) (input-dependent, one "
                         f"group); got B {tuple(B.shape)} and C {tuple(C.shape)}")
    dt = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, B, C


def _finish(y, u, D, z, dtype_in):
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def _chunk_len(seqlen: int) -> int:
    """Chunk length minimising the Python steps of `_scan`: 4 per chunk step, 2 per chunk, 1 per tail step."""
    hi = max(1, math.isqrt(2 * seqlen) + 1)
    return min(range(1, min(hi, seqlen) + 1), key=lambda T: 4 * T + 2 * (seqlen // T) + seqlen % T)


@torch.no_grad()
def _scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, chunk_size: Optional[int] = None,
          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 0 from h = 0 (reverse: h_t = a_t * h_{t+1} + b_t from the end).
    a, b: (L, ...) contiguous, same shape; `out` may be b itself (in place). Two-level chunked scan (see
    module docstring)."""
    L = a.shape[0]
    T = min(chunk_size or _chunk_len(L), L)
    nc, rem = L // T, L % T
    h = torch.empty_like(b) if out is None else out
    main = slice(rem, L) if reverse else slice(0, nc * T)
    tail = range(rem - 1, -1, -1) if reverse else range(nc * T, L)
    av, bv, hv = (t[main].view(nc, T, -1) for t in (a, b, h))  # (nC, T, M)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    chunks = range(nc - 1, -1, -1) if reverse else range(nc)
    incoming = torch.zeros_like(bv[:, 0])  # (nC, M)
    carry = torch.zeros_like(bv[0, 0])  # (M,)
    if nc > 1:  # pass 1: every chunk from a zero state -> its end state and its total decay
        end, decay = torch.zeros_like(incoming), torch.ones_like(incoming)
        for t in steps:
            end.mul_(av[:, t]).add_(bv[:, t])
            decay.mul_(av[:, t])
        for c in chunks:  # carry the true states across chunks
            incoming[c] = carry
            carry = torch.addcmul(end[c], decay[c], carry)
    state = incoming
    for t in steps:  # pass 2: every chunk from its incoming state, writing all states
        torch.addcmul(bv[:, t], av[:, t], state, out=hv[:, t])
        state = hv[:, t]
    state = state[chunks[-1]].view(b.shape[1:])  # the state at the end of the chunked part
    for t in tail:
        torch.addcmul(b[t], a[t], state, out=h[t])
        state = h[t]
    return h


class _SelectiveScanCore(torch.autograd.Function):
    """y[b, d, l] = sum_n C[b, n, l] h[l, b, d, n] with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t.

    Forward and backward run under no_grad with hand-written gradients, so that fwd+bwd is ~25 passes
    over the (L, B, D, N) states instead of an autograd graph over every chunk step. Backward: with
    g_h = g_y C, the state gradient is the reverse scan g_t = g_h,t + a_{t+1} g_{t+1}; then
    g_b = g_t, g_(log a)_t = g_t h_{t-1} a_t, and the chain rule to delta, u, A, B, C."""

    @staticmethod
    def forward(ctx, delta, u, A, B, C, chunk_size):
        dl = delta.permute(2, 0, 1)  # (L, B, D) view
        du = (delta * u).permute(2, 0, 1)  # (L, B, D)
        Bt, Ct = B.permute(2, 0, 1), C.permute(2, 0, 1)  # (L, B, N) views
        shape = (*dl.shape, A.shape[-1])  # (L, B, D, N); explicit contiguous outputs (inputs are permuted)
        a = torch.mul(dl.unsqueeze(-1), A, out=delta.new_empty(shape)).exp_()  # in (0, 1]
        h = torch.mul(du.unsqueeze(-1), Bt.unsqueeze(2), out=delta.new_empty(shape))  # b, then the states
        _scan(a, h, chunk_size=chunk_size, out=h)
        y = torch.matmul(h, Ct.unsqueeze(-1)).squeeze(-1)  # (L, B, D)
        ctx.save_for_backward(delta, u, A, B, C, a, h)
        ctx.chunk_size = chunk_size
        return y.permute(1, 2, 0).contiguous()  # (B, D, L)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        delta, u, A, B, C, a, h = ctx.saved_tensors
        dl, ul = delta.permute(2, 0, 1), u.permute(2, 0, 1)  # (L, B, D)
        Bt, Ct = B.permute(2, 0, 1), C.permute(2, 0, 1)  # (L, B, N)
        gyl = gy.permute(2, 0, 1)  # (L, B, D)
        gC = torch.matmul(gyl.unsqueeze(2), h).squeeze(2)  # (L, B, N)
        g = torch.mul(gyl.unsqueeze(-1), Ct.unsqueeze(2), out=h.new_empty(h.shape))  # (L, B, D, N): from y_t only
        if g.shape[0] > 1:  # reverse scan g_t += a_{t+1} g_{t+1}, in place
            g[-2].addcmul_(a[-1], g[-1])
            _scan(a[1:], g[:-1], reverse=True, chunk_size=ctx.chunk_size, out=g[:-1])
        gdu = torch.matmul(g, Bt.unsqueeze(-1)).squeeze(-1)  # (L, B, D)
        du = dl * ul
        gB = torch.matmul(du.unsqueeze(2), g).squeeze(2)  # (L, B, N)
        w = h.new_empty(h.shape)  # dLoss/d(log a) = g_t * h_{t-1} * a_t
        w[0].zero_()
        torch.mul(g[1:], h[:-1], out=w[1:])
        w.mul_(a)
        gA = (w * dl.unsqueeze(-1)).sum((0, 1))  # (D, N)
        gdl = w.mul_(A).sum(-1)  # (L, B, D)
        gdelta = (gdl + gdu * ul).permute(1, 2, 0)  # (B, D, L)
        gu = (gdu * dl).permute(1, 2, 0)
        return gdelta, gu, gA, gB.permute(1, 2, 0), gC.permute(1, 2, 0), None


@torch.compiler.disable  # a Python loop over time: torch.compile runs it eagerly, as it does the CUDA kernels
def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, chunk_size: Optional[int] = None):
    """Selective scan without a per-timestep Python loop over L (see module docstring).

    u: (B, D, L); delta: (B, D, L); A: (D, N) (negative reals); B, C: (B, N, L); D: (D,);
    z: (B, D, L); delta_bias: (D,). Computes in fp32 (fp64 for fp64 inputs); returns out (B, D, L) in
    u's dtype, and the final state (B, D, N) in the compute dtype when return_last_state.
    """
    dtype_in = u.dtype
    # fp32 as promised also under autocast (bf16 on CPU: its matmuls would run in bf16, and the hand-written
    # backward would meet a bf16 gradient beside fp32 states)
    with torch.autocast(u.device.type, enabled=False) if u.device.type in ("cpu", "cuda") else nullcontext():
        u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
        if return_last_state:  # rarely needed (tests): recompute the final state separately
            a = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A).contiguous()
            b = ((delta * u).permute(2, 0, 1).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)).contiguous()
            last = _scan(a.detach(), b.detach(), chunk_size=chunk_size)[-1]
        y = _SelectiveScanCore.apply(delta, u, A, B.contiguous(), C.contiguous(), chunk_size)  # (B, D, L)
        out = _finish(y, u, D, z, dtype_in)
    return (out, last) if return_last_state else out


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The recurrence one time step at a time (like mamba-ssm's selective_scan_ref): the test oracle."""
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    bsz, dim, seqlen = u.shape
    h = u.new_zeros(bsz, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        a = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        h = a * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = _finish(y, u, D, z, dtype_in)
    return (out, h) if return_last_state else out
