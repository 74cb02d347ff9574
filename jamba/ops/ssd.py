"""Mamba-2 state-space duality (SSD): a chunked pure-PyTorch reference and a naive loop (for tests).

Both follow mamba-ssm's `mamba_chunk_scan_combined` contract. Per head h (scalar A_h < 0), with
a_t = exp(dt_t * A_h) and state H_t of shape (P, N):

    H_t = a_t * H_{t-1} + dt_t * x_t B_t^T,     y_t = H_t C_t + D_h * x_t,     out = y * silu(z)

The chunked form (Mamba-2 paper, "ssd_minimal"): inside a chunk of T steps the output is a masked
(T x T) matrix product with the decay matrix exp(segsum(dt * A)) (exact, all exponents <= 0);
chunk-final states are carried across chunks by a short loop over chunks (memory O(L * T), never
O(L^2)); each position then adds C_t times the incoming state decayed to t.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = x[j+1] + ... + x[i] for i >= j, -inf above the
    diagonal; summed by a masked cumsum (no differences of cumsums, so no cancellation)."""
    T = x.shape[-1]
    xx = x[..., None].expand(*x.shape, T)  # xx[..., i, j] = x[i]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    s = torch.cumsum(xx.masked_fill(~strict, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return s.masked_fill(~lower, float("-inf"))


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(cd) for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    nheads, ngroups = x.shape[2], B.shape[2]
    if nheads % ngroups:
        raise ValueError(f"ssd: {nheads} heads are not divisible by {ngroups} groups of B/C")
    B = B.repeat_interleave(nheads // ngroups, dim=2)  # (b, L, h, n): head h uses group h // (H / G)
    C = C.repeat_interleave(nheads // ngroups, dim=2)
    return x, dt, A, B, C


def _finish(y, x, D, z, dtype_in):
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


@torch.compiler.disable  # a Python loop over time: torch.compile runs it eagerly, as it does the CUDA kernels
def ssd_chunked_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    chunk_size: int, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                    dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False,
                    return_final_states: bool = False):
    """Chunked SSD. x: (b, L, h, p); dt: (b, L, h); A: (h,); B, C: (b, L, g, n); D: (h,) or (h, p);
    z: (b, L, h, p); dt_bias: (h,). Computes in fp32 (fp64 for fp64 inputs); returns (b, L, h, p) in
    x's dtype (and the final state (b, h, p, n) when return_final_states)."""
    dtype_in = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    x_in = x
    b, seqlen, h, p = x.shape
    T = min(chunk_size, seqlen)
    nc = math.ceil(seqlen / T)
    pad = nc * T - seqlen
    if pad:  # dt = 0 on padding: decay 1 and no input, so states are unchanged; outputs are cut off
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    x, B, C = (t.unflatten(1, (nc, T)) for t in (x, B, C))  # (b, c, T, h, .)
    dt = dt.unflatten(1, (nc, T))  # (b, c, T, h)
    xdt = x * dt[..., None]  # (b, c, T, h, p)
    dA = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, T), <= 0
    dA_cs = torch.cumsum(dA, dim=-1)  # (b, h, c, T)

    # 1. Within chunks: y_l = sum_{s<=l} (C_l . B_s) exp(dA[s+1] + ... + dA[l]) dt_s x_s.
    decay = torch.exp(_segsum(dA))  # (b, h, c, T, T)
    CB = torch.einsum("bclhn,bcshn->bhcls", C, B)  # (b, h, c, T, T)
    y = torch.einsum("bhcls,bcshp->bclhp", CB * decay, xdt)  # (b, c, T, h, p)

    # 2. Chunk-final states from a zero start, then carried across chunks.
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs).permute(0, 2, 3, 1)  # (b, c, T, h), <= 1
    local = torch.einsum("bclhn,bclhp->bchpn", B, xdt * decay_to_end[..., None])  # (b, c, h, p, n)
    chunk_decay = torch.exp(dA_cs[..., -1])  # (b, h, c)
    carry = torch.zeros_like(local[:, 0])  # (b, h, p, n)
    incoming = []
    for c in range(nc):
        incoming.append(carry)
        carry = chunk_decay[:, :, c, None, None] * carry + local[:, c]
    incoming = torch.stack(incoming, dim=1)  # (b, c, h, p, n)

    # 3. Contribution of the incoming state, decayed from the chunk start to each position.
    decay_from_start = torch.exp(dA_cs).permute(0, 2, 3, 1)  # (b, c, T, h)
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, incoming) * decay_from_start[..., None]
    y = y.flatten(1, 2)[:, :seqlen]  # (b, L, h, p)
    out = _finish(y, x_in, D, z, dtype_in)
    return (out, carry) if return_final_states else out


def ssd_naive(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, return_final_states=False):
    """The SSD recurrence one time step at a time: the test oracle."""
    dtype_in = x.dtype
    x, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    b, seqlen, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(seqlen):
        a = torch.exp(dt[:, t] * A)  # (b, h)
        state = a[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1)
    out = _finish(y, x, D, z, dtype_in)
    return (out, state) if return_final_states else out
