"""Projections that produce the Mamba-1 scan's operands channel-first, (B, D, L) with unit stride along L,
without the transposing copies a (B, L, D) layout costs on every layer.

The CUDA scan and conv kernels want channel-first tensors with stride(-1) == 1 but accept any batch and
channel strides. Produced token-major, each operand costs a transposing copy in forward and again for its
gradient in backward; the interleaved in_proj (rows [x_0, z_0, x_1, z_1, ...], see jamba/mamba.py) also
needs its split and, in backward, a re-interleave of dx and dz with element stride 2, the slowest copy in
the step (18 ms per step on bench-3b 4K x 4 on one H100, measured by `python -m launch.bench --profile`).

- `interleaved_in_proj(hidden, weight, bias)`: one GEMM `W @ h^T` into a (D, 2, B, L) buffer; x and z are
  views of it with unit L-stride. Backward writes dx and dz into one (2D, B*L) buffer with coalesced
  copies and runs two plain GEMMs (dW and dh).
- `channel_first_linear(x, weight)`: (B, L, K) @ W^T as (B, N, L) through one batched GEMM.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class _InterleavedInProj(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias):
        # hidden (B, L, H); weight (2D, H) with interleaved rows; bias (2D,) or None
        B, L, H = hidden.shape
        h2 = hidden.reshape(B * L, H)
        out = weight @ h2.t() if bias is None else torch.addmm(bias[:, None], weight, h2.t())  # (2D, B*L)
        out = out.view(-1, 2, B, L)  # (D, 2, B, L): row 2c + j of out is channel c of x (j=0) or z (j=1)
        ctx.save_for_backward(h2, weight)
        ctx.has_bias, ctx.shape = bias is not None, (B, L, H)
        return out[:, 0].permute(1, 0, 2), out[:, 1].permute(1, 0, 2)  # x, z: (B, D, L), strides (L, 2BL, 1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dx, dz):
        h2, weight = ctx.saved_tensors
        B, L, H = ctx.shape
        D = weight.shape[0] // 2
        ref = dx if dx is not None else dz
        d = torch.empty(D, 2, B, L, dtype=ref.dtype, device=ref.device)  # (D, 2, B, L), same layout as out
        for j, g in enumerate((dx, dz)):
            if g is None:
                d[:, j].zero_()
            else:
                d[:, j].copy_(g.permute(1, 0, 2))  # unit stride along L on both sides: coalesced
        d = d.view(2 * D, B * L)
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            dh = (d.t() @ weight.to(d.dtype)).view(B, L, H)
        if ctx.needs_input_grad[1]:
            dw = d @ h2.to(d.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = d.sum(1)
        return dh, dw, db


@torch.compiler.disable  # eager: Inductor's fusion of the backward's two copies was slower (16 ms/step at 16K x 1)
def interleaved_in_proj(hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, L, H) @ weight.T + bias, weight (2D, H) with rows interleaved per channel
    ([x_0, z_0, x_1, z_1, ...]) -> x, z, each (B, D, L) with unit stride along L (views of one buffer).
    Same values as `F.linear(hidden, weight, bias).unflatten(-1, (-1, 2)).unbind(-1)` transposed."""
    return _InterleavedInProj.apply(hidden, weight, bias)


def channel_first_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, L, K), weight (N, K) -> (B, N, L) contiguous: F.linear(x, weight).transpose(1, 2) made
    channel-first by the GEMM itself (one batched GEMM; the weight is broadcast, not copied)."""
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x.transpose(1, 2))  # autocast casts both
