"""Mamba-1 selective scan: a chunked pure-PyTorch reference and a naive sequential loop (for tests).

Both follow mamba-ssm's `selective_scan_fn` contract. With per-step decay a_t = exp(delta_t * A) and
input b_t = delta_t * B_t * u_t (per channel d and state n):

    h_t = a_t * h_{t-1} + b_t,      y_t = sum_n C_t[n] * h_t[n] + D * u_t,      out = y * silu(z)

The reference computes the states with `linear_scan`, a chunked two-level scan: L is cut into nC chunks
of T ~ sqrt(L / 2) steps; pass 1 runs the T steps of all chunks at once from a zero state to get each
chunk's end state and total decay; a loop over the nC chunks carries the true incoming states; pass 2
reruns the T steps of all chunks from their incoming states, writing every state. So the Python loop
count is ~2T + nC ~ 3 sqrt(L / 2) (48 at L = 512), not L. Only products of decays <= 1 are formed
(no exp(-cumsum) trick that overflows for long chunks or large dt): as stable as the sequential loop.
Its backward (a custom autograd.Function) is the same scan run in reverse on the output gradient, under
no_grad, so fwd+bwd costs a few passes over the (L, B, D, N) states instead of an autograd graph of L
steps. Memory: the states, O(B * D * L * N), like the sequential loop; never O(L^2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


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
def _scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False, chunk_size: Optional[int] = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 0 from h = 0 (reverse: h_t = a_t * h_{t+1} + b_t from the end).
    a, b: (L, ...) contiguous, same shape. Two-level chunked scan (see module docstring)."""
    L = a.shape[0]
    T = min(chunk_size or _chunk_len(L), L)
    nc, rem = L // T, L % T
    h = torch.empty_like(b)
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


class _LinearScan(torch.autograd.Function):
    """h = scan(a, b) along dim 0. Backward: g_b = reverse scan of g_h with coefficients a_{t+1},
    g_a_t = g_b_t * h_{t-1}."""

    @staticmethod
    def forward(ctx, a, b, chunk_size):
        h = _scan(a, b, chunk_size=chunk_size)
        ctx.save_for_backward(a, h)
        ctx.chunk_size = chunk_size
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        a, h = ctx.saved_tensors
        a_next = torch.empty_like(a)
        a_next[:-1] = a[1:]
        a_next[-1] = 0
        gb = _scan(a_next, gh.contiguous(), reverse=True, chunk_size=ctx.chunk_size)
        ga = torch.empty_like(a)
        ga[0] = 0
        torch.mul(gb[1:], h[:-1], out=ga[1:])
        return ga, gb, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Differentiable first-order linear recurrence h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along dim 0."""
    return _LinearScan.apply(a.contiguous(), b.contiguous(), chunk_size)


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
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    Bt, Ct = B.permute(2, 0, 1), C.permute(2, 0, 1)  # (L, B, N)
    a = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A)  # (L, B, D, N), in (0, 1]
    b = (delta * u).permute(2, 0, 1).unsqueeze(-1) * Bt.unsqueeze(2)  # (L, B, D, N)
    h = linear_scan(a, b, chunk_size)  # (L, B, D, N)
    y = torch.einsum("lbdn,lbn->bdl", h, Ct)  # (B, D, L)
    out = _finish(y, u, D, z, dtype_in)
    return (out, h[-1]) if return_last_state else out


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
