"""Mamba mixers of the hybrid: Jamba's Mamba-1 mixer and the Mamba-2 (SSD) mixer.

Interface (like every mixer): `Mixer(cfg, layer_idx)`, `forward(hidden (B, L, H), doc_ids=None) -> (B, L, H)`,
`reset_parameters()` for the Mamba-specific init (the model's `init_weights` runs it after its generic
normal init of Linear weights). The scan and the conv go through `jamba.ops.kernels` (CUDA kernels or
pure-PyTorch references; which one runs is logged once).

Document masking: `doc_ids` is accepted and ignored. `cfg.document_masking` masks attention only; the
Mamba state flows across packed-document boundaries, as in Jamba and transformers' JambaForCausalLM
(mamba-ssm's `selective_scan_fn` has no state reset, so the Mamba-1 kernel path could not honour one).

Tensor parallelism: the mixers read the local sizes from their weights (never cfg.d_inner inside
forward), so a row shard of in_proj / conv1d / dt_proj / A_log / D and a column shard of out_proj
along d_inner run unchanged; x_proj is called as a module so the parallel package can all-reduce its
output over the d_inner shards with hooks.

Context parallelism: Mamba1Mixer.forward is three seams around the channel-wise middle (conv + scan):
`_in_proj` (tokens -> channel-first x, z), `_x_proj` (channels -> per-token dt/B/C) and `_out_proj`
(channel-first y -> tokens). parallel/context_parallel.py wraps them per instance (an all-to-all from
sequence shards to channel shards and back, a sum of x_proj's partial products); the model stays as is.
Mamba2Mixer has one seam, `_conv_ssd` (xBC, dt -> y, the per-head part), which it replaces by an
all-to-all to head shards, the same `conv_ssd` on the rank's heads, and the way back.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from jamba.config import JambaConfig
from jamba.layers import RMSNorm
from jamba.log_once import LogOnce
from jamba.ops import kernels
from jamba.ops.channel_first import channel_first_linear, interleaved_in_proj

logger = logging.getLogger(__name__)
_log_once = LogOnce(logger)


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm (mamba-ssm RMSNormGated, norm_before_gate=False): the statistics of
    y * silu(z) are taken in fp32 (fp64 for fp64) per group of `group_size` channels, then scaled by weight."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        cd = torch.promote_types(dtype, torch.float32)
        g = (y.to(cd) * F.silu(z.to(cd))).unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.to(cd)).to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def _init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, dt_floor: float) -> None:
    """Mamba-paper dt init: dt ~ log-uniform in [dt_min, dt_max], clamped below at dt_floor; the bias is
    softplus^-1(dt) = dt + log(1 - exp(-dt)), so softplus(bias) = dt at initialisation."""
    with torch.no_grad():
        dt = torch.exp(torch.rand(bias.shape, device=bias.device, dtype=torch.float32)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for the scan parameters (A, D, dt bias), as the kernels want; fp64 stays fp64 (tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _plain(t: torch.Tensor) -> bool:
    """A plain tensor or Parameter (not a tensor subclass such as a DTensor)."""
    return type(t) in (torch.Tensor, nn.Parameter)


def _log_doc_ids_once(doc_ids) -> None:
    if doc_ids is not None:
        _log_once("doc_ids", "Mamba mixers ignore doc_ids: document masking applies to attention layers; "
                  "the Mamba state is carried across packed-document boundaries (as in Jamba / HF JambaForCausalLM)")


class Mamba1Mixer(nn.Module):
    """Jamba's Mamba-1 mixer (HF JambaMambaMixer): in_proj -> depthwise causal conv + SiLU -> x_proj ->
    [dt, B, C] -> RMSNorm each -> dt_proj (weight only; its bias enters the scan as delta_bias, softplus)
    -> selective scan with D skip and silu(z) gate -> out_proj.

    in_proj's output features are interleaved per channel (2c = x_c, 2c+1 = z_c); HF's layout is
    [x; z] (jamba/hf.py permutes).
    """

    def __init__(self, cfg: JambaConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        d_inner, n, r, k = cfg.d_inner, cfg.mamba_d_state, cfg.dt_rank, cfg.mamba_d_conv
        self.d_state, self.dt_rank = n, r
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * d_inner, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, k, groups=d_inner, padding=k - 1, bias=cfg.mamba_conv_bias)
        self.x_proj = nn.Linear(d_inner, r + 2 * n, bias=False)
        self.dt_layernorm = RMSNorm(r, eps=cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, eps=cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, eps=cfg.rms_norm_eps)
        self.dt_proj = nn.Linear(r, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, n))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba-paper init of the Mamba-specific parameters (in_proj, x_proj, out_proj keep theirs):
        dt_proj.weight ~ U(+-dt_rank^-0.5) (dt_scale = 1); dt_proj.bias = softplus^-1(dt), dt log-uniform
        in [dt_min, dt_max] clamped at dt_init_floor; A_log[c] = log(1..N) (S4D-real); D = 1; conv1d
        PyTorch default; the dt/B/C RMSNorm weights = 1."""
        cfg = self.cfg
        with torch.no_grad():
            bound = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            _init_dt_bias(self.dt_proj.bias, cfg.mamba_dt_min, cfg.mamba_dt_max, cfg.mamba_dt_init_floor)
            a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand_as(self.A_log))
            nn.init.ones_(self.D)
            self.conv1d.reset_parameters()
            for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
                norm.reset_parameters()

    def _in_proj(self, hidden: torch.Tensor):
        """hidden (B, L, H) -> x, z (B, Di, L) with unit stride along L (the scan's and conv's layout)."""
        w, b = self.in_proj.weight, self.in_proj.bias
        if _plain(w) and _plain(hidden) and (b is None or _plain(b)):
            return interleaved_in_proj(hidden, w, b)  # one GEMM, no split/transposing copies
        # Tensor subclasses (e.g. the DTensors of a tensor-parallel in_proj): through the module and autograd.
        x, z = self.in_proj(hidden).unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, Di) each
        return x.transpose(1, 2).contiguous(), z.transpose(1, 2)

    def forward(self, hidden: torch.Tensor, doc_ids=None) -> torch.Tensor:
        _log_doc_ids_once(doc_ids)
        dtype = hidden.dtype
        x, z = self._in_proj(hidden)  # (B, Di, L) each, unit stride along L
        x = kernels.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = self._x_proj(x)  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_layernorm(dt)  # (B, L, R)
        B = self.b_layernorm(B).transpose(1, 2)  # (B, N, L)
        C = self.c_layernorm(C).transpose(1, 2)  # (B, N, L)
        dt = channel_first_linear(dt, self.dt_proj.weight)  # (B, Di, L); bias goes into the scan
        A = -torch.exp(_fp32(self.A_log))  # (Di, N)
        y = kernels.selective_scan(x, dt, A, B, C, D=_fp32(self.D), z=z,
                                   delta_bias=_fp32(self.dt_proj.bias), delta_softplus=True)  # (B, Di, L)
        return self._out_proj(y, dtype)  # (B, L, H)

    def _x_proj(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Di, L) after the conv -> [dt, B, C] (B, L, R + 2N): the one step that mixes channels."""
        return self.x_proj(x.transpose(1, 2))

    def _out_proj(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y (B, Di, L) from the scan -> (B, L, H) in the model dtype."""
        return self.out_proj(y.transpose(1, 2).to(dtype))


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer (mamba-ssm's Mamba2 with rmsnorm=True, norm_before_gate=False, d_ssm = d_inner;
    the mixer of Nemotron-H / Bamba / Falcon-H1): in_proj -> [z, xBC, dt] -> depthwise causal conv +
    SiLU on xBC -> [x, B, C] -> SSD with per-head scalar A, D skip, dt_bias, softplus -> gated RMSNorm
    norm(y * silu(z)) per group -> out_proj. Parameter names are mamba-ssm's / HF Mamba2's: in_proj,
    conv1d, dt_bias, A_log (nheads,), D (nheads,), norm.weight, out_proj. Not tensor-parallel."""

    norm_eps = 1e-5  # mamba-ssm's Mamba2 RMSNormGated eps

    def __init__(self, cfg: JambaConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.d_inner, self.d_state = cfg.d_inner, cfg.mamba_d_state
        self.head_dim, self.ngroups = cfg.mamba2_head_dim, cfg.mamba2_n_groups
        self.nheads = cfg.mamba2_nheads
        self.chunk_size = cfg.mamba2_chunk_size
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        k = cfg.mamba_d_conv
        # output features: [z (d_inner), x (d_inner), B (G * N), C (G * N), dt (nheads)]
        self.in_proj = nn.Linear(cfg.hidden_size, self.d_inner + self.conv_dim + self.nheads, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim, padding=k - 1,
                                bias=cfg.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // self.ngroups, eps=self.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba-ssm's Mamba2 init of the Mamba-specific parameters (in_proj and out_proj keep theirs):
        dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] clamped at dt_init_floor;
        A_log = log(A), A ~ U(1, 16) per head; D = 1; conv1d PyTorch default; norm weight = 1."""
        cfg = self.cfg
        with torch.no_grad():
            _init_dt_bias(self.dt_bias, cfg.mamba_dt_min, cfg.mamba_dt_max, cfg.mamba_dt_init_floor)
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16)))
            nn.init.ones_(self.D)
            self.conv1d.reset_parameters()
            self.norm.reset_parameters()

    def forward(self, hidden: torch.Tensor, doc_ids=None) -> torch.Tensor:
        _log_doc_ids_once(doc_ids)
        zxbcdt = self.in_proj(hidden)  # (B, L, 2 Di + 2 G N + H)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        y = self._conv_ssd(xBC, dt)  # (B, L, Di)
        y = self.norm(y, z)  # (B, L, Di)
        return self.out_proj(y)  # (B, L, H)

    def _conv_ssd(self, xBC: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """The mixer's per-channel, per-head part: xBC (B, L, conv_dim), dt (B, L, H) -> y (B, L, Di).
        A seam: context parallelism (parallel/context_parallel.py) runs it on whole sequences for a slice of
        the heads."""
        return conv_ssd(xBC, dt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.A_log, self.D,
                        self.dt_bias, self.ngroups, self.d_state, self.head_dim, self.chunk_size)


def conv_ssd(xBC: torch.Tensor, dt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
             A_log: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, ngroups: int, d_state: int,
             head_dim: int, chunk_size: int) -> torch.Tensor:
    """Mamba-2's causal conv + SiLU over xBC = [x (H P) | B (G N) | C (G N)] (B, L, channels), then SSD with
    H = dt.shape[-1] heads of head_dim P in G groups (head h reads group h // (H / G)) -> y (B, L, H P).
    conv_weight (channels, k); A_log, D, dt_bias (H,)."""
    G, N, P, H = ngroups, d_state, head_dim, dt.shape[-1]
    xBC = kernels.causal_conv1d(xBC.transpose(1, 2).contiguous(), conv_weight, conv_bias,
                                activation="silu").transpose(1, 2)  # (B, L, channels)
    x, B, C = torch.split(xBC, [H * P, G * N, G * N], dim=-1)
    A = -torch.exp(_fp32(A_log))  # (H,)
    y = kernels.ssd_scan(x.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)),
                         chunk_size, D=_fp32(D), dt_bias=_fp32(dt_bias), dt_softplus=True)  # (B, L, H, P)
    return y.flatten(-2)
