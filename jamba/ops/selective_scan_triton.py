"""Mamba-1 selective scan in Triton: forward and a backward that reduces dB/dC over channel blocks.

Status: correct, measured, and NOT dispatched to: on one H100 it is 2.7x slower than mamba-ssm's CUDA kernel
(`python -m launch.bench_scan`; README, Performance). Kept as the measured baseline for the next attempt.

Same contract as mamba-ssm's `selective_scan_fn` for one group of input-dependent B, C (what Jamba uses):

    dt = softplus(delta + delta_bias),   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,
    y_t = sum_n C_t[n] h_t[n] + D u_t,   out = y * silu(z)

Why a second implementation next to mamba-ssm's CUDA kernel: that kernel gives every (batch, channel)
its own thread block, so the gradients of B and C, which are shared by all channels, are summed with one
fp32 atomic add per (channel, state, position): d_inner-way contention on every element of dB and dC.
Here a program owns a block of BD channels and all states and walks L in tiles of BL steps:

- forward: per tile, (BD, N, BL) decays and inputs, an associative scan along L started from the carried
  state, y reduced over N. The state entering every tile is stored, (batch, n_tiles, D, N) fp32, so the
  backward can restart any tile (memory: 32 / BL bytes per input element; 0.25 x the bf16 input at BL=128).
- backward: tiles in reverse. Each tile recomputes its states from the stored entry state, runs the
  reverse scan g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} (the shifted decay comes from a second, cached
  load of delta one step ahead, so no in-register shift is needed), and forms every gradient locally;
  dB and dC are summed over the BD channels before one atomic add per (state, position).
  g_t h_{t-1} exp(dt_t A) = g_t (h_t - dt_t u_t B_t) gives the dt and A gradients without h_{t-1}.

All arithmetic is fp32; u, delta, z and the output keep the caller's dtype (bf16 in training).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except Exception as e:  # noqa: BLE001 - not installed, or no usable backend
    triton, tl, TRITON_ERR = None, None, e
else:
    TRITON_ERR = None

LOG2E = 1.4426950408889634


def _tile_config(dim: int) -> Tuple[int, int, int]:
    """(BD, BL, num_warps). Overridable with JAMBA_SCAN_TILE=BD,BL,WARPS (for benchmarking sweeps)."""
    env = os.environ.get("JAMBA_SCAN_TILE")
    if env:
        bd, bl, nw = (int(v) for v in env.split(","))
        return bd, bl, nw
    return 4, 64, 4


if triton is not None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(x):
        return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, Dp_ptr, bias_ptr, out_ptr, st_ptr,
        L, DIM, N, n_tiles,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
        sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, so_b, so_d, so_l,
        HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        n = tl.arange(0, BN)
        j = tl.arange(0, BL)
        dm, nm = d < DIM, n < N
        dn_mask = dm[:, None] & nm[None, :]
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0)  # (BD, BN)
        A2 = A * 1.4426950408889634
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=dm, other=0.0)
        if HAS_D:
            Dp = tl.load(Dp_ptr + d, mask=dm, other=0.0)
        h = tl.zeros((BD, BN), dtype=tl.float32)
        st_base = st_ptr + pid_b * n_tiles * DIM * N + d[:, None] * N + n[None, :]
        for t in range(n_tiles):
            l = t * BL + j
            m = dm[:, None] & (l < L)[None, :]
            dt = tl.load(dt_ptr + pid_b * sdt_b + d[:, None] * sdt_d + l[None, :] * sdt_l, mask=m, other=0.0)
            dt = dt.to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(m, dt, 0.0)
            u = tl.load(u_ptr + pid_b * su_b + d[:, None] * su_d + l[None, :] * su_l, mask=m, other=0.0)
            u = u.to(tl.float32)
            bl_mask = nm[:, None] & (l < L)[None, :]
            Bm = tl.load(B_ptr + pid_b * sB_b + n[:, None] * sB_n + l[None, :] * sB_l, mask=bl_mask, other=0.0)
            Cm = tl.load(C_ptr + pid_b * sC_b + n[:, None] * sC_n + l[None, :] * sC_l, mask=bl_mask, other=0.0)
            tl.store(st_base + t * DIM * N, h, mask=dn_mask)  # the state entering tile t
            dA = tl.exp2(dt[:, None, :] * A2[:, :, None])  # (BD, BN, BL)
            dBu = (dt * u)[:, None, :] * Bm.to(tl.float32)[None, :, :]
            acum, hs = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
            hh = hs + acum * h[:, :, None]
            y = tl.sum(hh * Cm.to(tl.float32)[None, :, :], axis=1)  # (BD, BL)
            if HAS_D:
                y = y + Dp[:, None] * u
            if HAS_Z:
                zz = tl.load(z_ptr + pid_b * sz_b + d[:, None] * sz_d + l[None, :] * sz_l, mask=m, other=0.0)
                zz = zz.to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(out_ptr + pid_b * so_b + d[:, None] * so_d + l[None, :] * so_l,
                     y.to(out_ptr.dtype.element_ty), mask=m)
            h = tl.sum(tl.where((j == BL - 1)[None, None, :], hh, 0.0), axis=2)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, Dp_ptr, bias_ptr, dout_ptr, st_ptr,
        du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        L, DIM, N, n_tiles,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
        sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sdo_b, sdo_d, sdo_l,
        HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
    ):
        # Gradient outputs du, ddt, dz: contiguous (batch, DIM, L). dB, dC: fp32 (batch, L, N), zeroed.
        # dA: fp32 (DIM, N), dD, dbias: fp32 (DIM,), zeroed (summed over the batch with atomics).
        pid_b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        n = tl.arange(0, BN)
        j = tl.arange(0, BL)
        dm, nm = d < DIM, n < N
        dn_mask = dm[:, None] & nm[None, :]
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0)
        A2 = A * 1.4426950408889634
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=dm, other=0.0)
        if HAS_D:
            Dp = tl.load(Dp_ptr + d, mask=dm, other=0.0)
        g_next = tl.zeros((BD, BN), dtype=tl.float32)  # g at the first step of the tile after this one
        dA_acc = tl.zeros((BD, BN), dtype=tl.float32)
        dD_acc = tl.zeros((BD,), dtype=tl.float32)
        dbias_acc = tl.zeros((BD,), dtype=tl.float32)
        st_base = st_ptr + pid_b * n_tiles * DIM * N + d[:, None] * N + n[None, :]
        g_base = pid_b * DIM * L + d[:, None] * L  # contiguous gradient outputs
        for tr in range(n_tiles):
            t = n_tiles - 1 - tr
            l = t * BL + j
            lm = l < L
            m = dm[:, None] & lm[None, :]
            m1 = dm[:, None] & (l + 1 < L)[None, :]
            dt_raw = tl.load(dt_ptr + pid_b * sdt_b + d[:, None] * sdt_d + l[None, :] * sdt_l, mask=m, other=0.0)
            dt_raw = dt_raw.to(tl.float32)
            dt1 = tl.load(dt_ptr + pid_b * sdt_b + d[:, None] * sdt_d + (l + 1)[None, :] * sdt_l, mask=m1,
                          other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt_raw = dt_raw + bias[:, None]
                dt1 = dt1 + bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt_raw)
                dt1 = _softplus(dt1)
            else:
                dt = dt_raw
            dt = tl.where(m, dt, 0.0)
            u = tl.load(u_ptr + pid_b * su_b + d[:, None] * su_d + l[None, :] * su_l, mask=m, other=0.0)
            u = u.to(tl.float32)
            dout = tl.load(dout_ptr + pid_b * sdo_b + d[:, None] * sdo_d + l[None, :] * sdo_l, mask=m, other=0.0)
            dout = dout.to(tl.float32)
            bl_mask = nm[:, None] & lm[None, :]
            Bm = tl.load(B_ptr + pid_b * sB_b + n[:, None] * sB_n + l[None, :] * sB_l, mask=bl_mask, other=0.0)
            Cm = tl.load(C_ptr + pid_b * sC_b + n[:, None] * sC_n + l[None, :] * sC_l, mask=bl_mask, other=0.0)
            Bm, Cm = Bm.to(tl.float32), Cm.to(tl.float32)
            h0 = tl.load(st_base + t * DIM * N, mask=dn_mask, other=0.0)
            # states of this tile, recomputed from its entry state
            dA = tl.exp2(dt[:, None, :] * A2[:, :, None])
            dtu = dt * u
            dBu = dtu[:, None, :] * Bm[None, :, :]
            acum, hs = tl.associative_scan((dA, dBu), axis=2, combine_fn=_combine)
            hh = hs + acum * h0[:, :, None]
            if HAS_Z:
                zz = tl.load(z_ptr + pid_b * sz_b + d[:, None] * sz_d + l[None, :] * sz_l, mask=m, other=0.0)
                zz = zz.to(tl.float32)
                sg = tl.sigmoid(zz)
                y = tl.sum(hh * Cm[None, :, :], axis=1)
                if HAS_D:
                    y = y + Dp[:, None] * u
                dz = dout * y * sg * (1.0 + zz * (1.0 - sg))
                tl.store(dz_ptr + g_base + l[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
                dy = dout * zz * sg
            else:
                dy = dout
            if HAS_D:
                dD_acc += tl.sum(dy * u, axis=1)
                du = dy * Dp[:, None]
            else:
                du = tl.zeros((BD, BL), dtype=tl.float32)
            # reverse scan of the state gradient: g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
            dA1 = tl.where(m1[:, None, :], tl.exp2(dt1[:, None, :] * A2[:, :, None]), 0.0)
            cg = Cm[None, :, :] * dy[:, None, :]
            gacum, gs = tl.associative_scan((dA1, cg), axis=2, combine_fn=_combine, reverse=True)
            g = gs + gacum * g_next[:, :, None]
            g_next = tl.sum(tl.where((j == 0)[None, None, :], g, 0.0), axis=2)
            gB = tl.sum(g * Bm[None, :, :], axis=1)  # (BD, BL)
            du += gB * dt
            w = g * (hh - dBu)  # g_t h_{t-1} exp(dt_t A)
            ddt = gB * u + tl.sum(w * A[:, :, None], axis=1)
            dA_acc += tl.sum(w * dt[:, None, :], axis=2)
            dB = tl.sum(g * dtu[:, None, :], axis=0)  # (BN, BL): summed over this block's channels
            dC = tl.sum(hh * dy[:, None, :], axis=0)
            tl.atomic_add(dB_ptr + pid_b * L * N + l[None, :] * N + n[:, None], dB, mask=bl_mask)
            tl.atomic_add(dC_ptr + pid_b * L * N + l[None, :] * N + n[:, None], dC, mask=bl_mask)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)  # softplus' = sigmoid (exactly 1 past the threshold in fp32)
            ddt = tl.where(m, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=1)
            tl.store(du_ptr + g_base + l[None, :], du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddt_ptr + g_base + l[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m)
        tl.atomic_add(dA_ptr + d[:, None] * N + n[None, :], dA_acc, mask=dn_mask)
        if HAS_D:
            tl.atomic_add(dD_ptr + d, dD_acc, mask=dm)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + d, dbias_acc, mask=dm)


def _strides3(t: Optional[torch.Tensor], like: torch.Tensor):
    return (t if t is not None else like).stride()


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        bsz, dim, L = u.shape
        N = A.shape[1]
        BD, BL, nw = _tile_config(dim)
        n_tiles = triton.cdiv(L, BL)
        out = torch.empty((bsz, dim, L), dtype=u.dtype, device=u.device)
        states = torch.empty((bsz, n_tiles, dim, N), dtype=torch.float32, device=u.device)
        A = A.float().contiguous()
        grid = (bsz, triton.cdiv(dim, BD))
        _scan_fwd_kernel[grid](
            u, delta, z if z is not None else u, B, C, A,
            D if D is not None else A, delta_bias if delta_bias is not None else A, out, states,
            L, dim, N, n_tiles, *u.stride(), *delta.stride(), *_strides3(z, u), *B.stride(), *C.stride(),
            *out.stride(), HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), BD=BD, BN=triton.next_power_of_2(N), BL=BL, num_warps=nw)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus = bool(delta_softplus)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        bsz, dim, L = u.shape
        N = A.shape[1]
        BD, BL, nw = _tile_config(dim)
        n_tiles = states.shape[1]
        assert triton.cdiv(L, BL) == n_tiles, "JAMBA_SCAN_TILE changed between forward and backward"
        du = torch.empty((bsz, dim, L), dtype=u.dtype, device=u.device)
        ddelta = torch.empty((bsz, dim, L), dtype=delta.dtype, device=u.device)
        dz = torch.empty((bsz, dim, L), dtype=z.dtype, device=u.device) if z is not None else None
        dB = torch.zeros((bsz, L, N), dtype=torch.float32, device=u.device)
        dC = torch.zeros((bsz, L, N), dtype=torch.float32, device=u.device)
        dA = torch.zeros((dim, N), dtype=torch.float32, device=u.device)
        dD = torch.zeros((dim,), dtype=torch.float32, device=u.device) if D is not None else None
        dbias = torch.zeros((dim,), dtype=torch.float32, device=u.device) if delta_bias is not None else None
        grid = (bsz, triton.cdiv(dim, BD))
        _scan_bwd_kernel[grid](
            u, delta, z if z is not None else u, B, C, A,
            D if D is not None else A, delta_bias if delta_bias is not None else A, dout, states,
            du, ddelta, dz if dz is not None else du, dB, dC, dA,
            dD if dD is not None else dA, dbias if dbias is not None else dA,
            L, dim, N, n_tiles, *u.stride(), *delta.stride(), *_strides3(z, u), *B.stride(), *C.stride(),
            *dout.stride(), HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, BD=BD, BN=triton.next_power_of_2(N), BL=BL, num_warps=nw)
        dB = dB.transpose(1, 2).to(B.dtype)
        dC = dC.transpose(1, 2).to(C.dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                          delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False) -> torch.Tensor:
    """u, delta, z: (batch, D, L), any strides; A: (D, N) fp32; B, C: (batch, N, L); D, delta_bias: (D,) fp32.
    Returns (batch, D, L) in u's dtype."""
    if triton is None:
        raise RuntimeError(f"selective_scan_triton needs Triton (pip install triton): {TRITON_ERR}")
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(f"selective_scan_triton: B and C must be (batch, d_state, seqlen) (one group); got "
                         f"B {tuple(B.shape)} and C {tuple(C.shape)}")
    if A.shape[1] > 64:
        raise ValueError(f"selective_scan_triton: d_state {A.shape[1]} > 64 is not supported (tiles hold all states)")
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
