"""Parameter counts and model FLOPs per token (for MFU).

Training FLOPs per token = 3 x forward (backward = 2 x forward; activation recomputation is not counted:
these are *model* FLOPs, as in the PaLM MFU definition). Forward FLOPs per token:

    2 * P_matmul                                  every Linear weight (q/k/v/o, MLP, router, Mamba in/x/dt/out
                                                  projections, lm_head even when tied) + experts * k/E;
                                                  the input embedding is a lookup (0 FLOPs)
  + sum over attention layers  4 * n_heads * head_dim * (L + 1) / 2
                                                  QK^T and AV, causal: a query attends (L + 1) / 2 keys on average
  + sum over Mamba-1 layers    9 * d_inner * d_state + 2 * d_inner * d_conv
                                                  selective scan (mamba-ssm's count: discretise, update, read out,
                                                  9 per channel-state) + depthwise causal conv
  + sum over Mamba-2 layers    2 * d_inner * d_conv' + chunk * (n_groups * d_state + d_inner)
                               + 4 * d_inner * d_state
                                                  conv over x,B,C; SSD intra-chunk C.B^T and its product with x
                                                  (causal half of chunk^2); chunk states and their read-out

So training FLOPs/token ~= 6 * (active non-embedding parameters) + attention + scan terms; norms, softmax,
activations and the loss are ignored (< 1%).
"""

from __future__ import annotations

import functools
import json
from typing import Dict

import torch
import torch.nn as nn

from jamba.config import JambaConfig


@functools.lru_cache(maxsize=32)
def _counts(cfg_json: str) -> Dict[str, int]:
    from jamba.model import JambaForCausalLM
    from jamba.moe import GroupedExperts

    cfg = JambaConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    counts = model.num_params()
    matmul = expert = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            matmul += m.weight.numel()
        elif isinstance(m, GroupedExperts):
            expert += sum(p.numel() for p in m.parameters())
    counts["experts"] = expert
    counts["matmul_active"] = matmul + expert * cfg.num_experts_per_tok // cfg.num_experts
    return counts


def param_counts(cfg: JambaConfig) -> Dict[str, int]:
    """{"total", "active", "embedding", "experts" (all expert weights), "matmul_active" (per-token matmul
    parameters: every Linear incl. lm_head + k/E of the experts)}; built on the meta device, cached."""
    return dict(_counts(json.dumps(cfg.to_dict(), sort_keys=True)))


def forward_flops_per_token(cfg: JambaConfig, seq_len: int) -> float:
    """Forward FLOPs per token at sequence length `seq_len` (formula in the module docstring)."""
    specs = cfg.layer_specs()
    n_attn = sum(s.mixer == "attention" for s in specs)
    n_mamba = len(specs) - n_attn
    flops = 2.0 * param_counts(cfg)["matmul_active"]
    flops += n_attn * 4.0 * cfg.num_attention_heads * cfg.attn_head_dim * (seq_len + 1) / 2
    di, n, k = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_d_conv
    if cfg.mamba_mixer == "mamba1":
        per_layer = 9.0 * di * n + 2.0 * di * k
    else:
        conv_dim = di + 2 * cfg.mamba2_n_groups * n
        chunk = min(cfg.mamba2_chunk_size, seq_len)
        per_layer = 2.0 * conv_dim * k + chunk * (cfg.mamba2_n_groups * n + di) + 4.0 * di * n
    return flops + n_mamba * per_layer


def flops_per_token(cfg: JambaConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token: 3 x forward."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
