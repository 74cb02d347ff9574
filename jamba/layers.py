"""Small building blocks of the decoder: RMSNorm (fp32 statistics) and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jamba.config import JambaConfig


class RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics, numerically identical to transformers' JambaRMSNorm:
    `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU feed-forward (HF JambaMLP): down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
