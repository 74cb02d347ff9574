"""Mamba-1 selective scan: a chunked pure-PyTorch reference and a naive sequential loop (for tests).

Both follow mamba-ssm's `selective_scan_fn` contract. With per-step decay a_t = exp(delta_t * A) and
input b_t = delta_t * B_t * u_t (per channel d and state n):

    h_t = a_t * h_{t-1} + b_t,      y_t = sum_n C_t[n] * h_t[n] + D * u_t,      out = y * silu(z)

The chunked reference splits L into nC chunks of T ~ sqrt(L) steps. Step 1 runs the recurrence for
the T positions of ALL chunks at once from a zero state (a T-step Python loop over (B, D, nC, N)
tensors). Step 2 carries the chunk-final states across chunks (an nC-step loop over (B, D, N)).
Step 3 adds each chunk's incoming state, decayed by exp(cumsum of the log decays inside the chunk),
to every position. Only products of decays <= 1 are formed (no exp(-cumsum) trick that overflows
for long chunks or large dt), so it is as stable as the sequential loop, and the Python loop count is
T + nC ~ 2 sqrt(L) (45 at L = 512, 128 at L = 4096) instead of L. Memory: O(B * D * L * N) like the
sequential loop (autograd keeps the states), never O(L^2).
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


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, chunk_size: Optional[int] = None):
    """Chunked selective scan (see module docstring), differentiable, no per-timestep loop over L.

    u: (B, D, L); delta: (B, D, L); A: (D, N) (negative reals); B, C: (B, N, L); D: (D,);
    z: (B, D, L); delta_bias: (D,). Computes in fp32 (fp64 for fp64 inputs); returns out (B, D, L) in
    u's dtype, and the final state (B, D, N) in the compute dtype when return_last_state.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    bsz, dim, seqlen = u.shape
    nstate = A.shape[1]
    T = chunk_size or max(1, math.ceil(math.sqrt(seqlen)))
    nc = math.ceil(seqlen / T)
    pad = nc * T - seqlen
    # Padding steps have delta = 0 (decay 1, input 0): they leave the state unchanged and are cut off.
    du = delta * u
    if pad:
        delta, du, B, C = (F.pad(t, (0, pad)) for t in (delta, du, B, C))

    def steps_first(t):  # (b, c, L) -> (T, b, c, nC): the loop index leads so its slices are contiguous
        return t.unflatten(-1, (nc, T)).permute(3, 0, 1, 2)

    log_a = steps_first(delta).unsqueeze(-1) * A[None, None, :, None, :]  # (T, B, D, nC, N), <= 0
    Bt = steps_first(B).transpose(2, 3).unsqueeze(2)  # (T, B, 1, nC, N)
    Ct = steps_first(C).transpose(2, 3).unsqueeze(2)  # (T, B, 1, nC, N)
    b = steps_first(du).unsqueeze(-1) * Bt  # (T, B, D, nC, N)
    a = torch.exp(log_a)

    # 1. Within-chunk recurrence from a zero state, all chunks at once.
    h = torch.zeros_like(b[0])  # (B, D, nC, N)
    hs = []
    for t in range(T):
        h = a[t] * h + b[t]
        hs.append(h)
    h_local = torch.stack(hs)  # (T, B, D, nC, N)

    # 2. Carry states across chunks: state entering chunk c+1 = decay(c) * state entering c + local end of c.
    decay_in = torch.exp(torch.cumsum(log_a, dim=0))  # (T, B, D, nC, N): decay from chunk start to t
    h_in = []
    carry = torch.zeros_like(h[:, :, 0])  # (B, D, N)
    for c in range(nc):
        h_in.append(carry)
        carry = decay_in[-1, :, :, c] * carry + h[:, :, c]
    h_in = torch.stack(h_in, dim=2)  # (B, D, nC, N)

    # 3. Full states and outputs.
    states = h_local + decay_in * h_in  # (T, B, D, nC, N)
    y = (states * Ct).sum(-1)  # (T, B, D, nC)
    y = y.permute(1, 2, 3, 0).reshape(bsz, dim, nc * T)[..., :seqlen]  # (B, D, L)
    out = _finish(y, u, D, z, dtype_in)
    return (out, carry) if return_last_state else out


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
