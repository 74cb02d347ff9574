"""Depthwise causal 1-D convolution: the pure-PyTorch reference of causal-conv1d's `causal_conv1d_fn`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      activation: Optional[str] = "silu") -> torch.Tensor:
    """Depthwise causal convolution, out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - K + 1 + k]).

    x: (B, D, L); weight: (D, K); bias: (D,) or None; activation: None, "silu" or "swish".
    Returns (B, D, L) in x's dtype (computed in weight's dtype, as causal-conv1d and HF do).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d_ref: activation={activation!r}; use None, 'silu' or 'swish'")
    dim, seqlen = x.shape[1], x.shape[2]
    k = weight.shape[-1]
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=k - 1, groups=dim)[..., :seqlen]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)
