"""Grouped-query causal self-attention (HF JambaAttention) through `F.scaled_dot_product_attention`.

No positional embedding by default (Jamba: the Mamba layers carry position); RoPE on q/k when
`cfg.use_rope`. With `cfg.document_masking` and `doc_ids` given, a token attends only to earlier tokens of
its own document (packed sequences). Head counts are read from the projection shapes at forward time, so a
head shard of q/k/v_proj (tensor parallelism) runs unchanged. `forward` is `_project` (per token) ->
`_attend` (mixes positions) -> `_output` (per token): context parallelism (parallel/context_parallel.py)
wraps `_attend` with all-to-alls between sequence shards and head shards.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from jamba.config import JambaConfig
from jamba.log_once import LogOnce

logger = logging.getLogger(__name__)
_log_once = LogOnce(logger)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype=torch.float32):
    """cos/sin tables (L, head_dim) of the rotary embedding (HF convention: halves, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, hd) rotated by position: x * cos + rotate_half(x) * sin (computed in fp32 or fp64)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) document ids -> (B, 1, L, L) bool, True where query t may attend key s: s <= t, same doc."""
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    return (same & causal)[:, None]


class Attention(nn.Module):
    """GQA causal attention: q_proj/k_proj/v_proj/o_proj (no bias), scale head_dim^-0.5."""

    def __init__(self, cfg: JambaConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = self.head_dim = cfg.attn_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._project(hidden)  # (B, heads, L, hd)
        return self._output(self._attend(q, k, v, doc_ids))  # (B, L, H)

    def _project(self, hidden: torch.Tensor):
        """hidden (B, L, H) -> q (B, nq, L, hd), k and v (B, nkv, L, hd); per token, no position yet."""
        B, L, _ = hidden.shape
        hd = self.head_dim
        q = self.q_proj(hidden).view(B, L, -1, hd).transpose(1, 2)  # (B, nq, L, hd)
        k = self.k_proj(hidden).view(B, L, -1, hd).transpose(1, 2)  # (B, nkv, L, hd)
        v = self.v_proj(hidden).view(B, L, -1, hd).transpose(1, 2)  # (B, nkv, L, hd)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: torch.Tensor | None) -> torch.Tensor:
        """Causal (document-masked) attention over the whole sequence: positions are 0..L-1 of q's L.
        q (B, nq, L, hd), k/v (B, nkv, L, hd), doc_ids (B, L) or None -> (B, nq, L, hd)."""
        L, hd = q.shape[2], self.head_dim
        if self.cfg.use_rope:
            cos, sin = rope_cos_sin(L, hd, self.cfg.rope_theta, q.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        if self.cfg.document_masking and doc_ids is not None:
            _log_once("docmask", "attention: document masking with a dense (B, 1, L, L) mask through SDPA")
            mask = document_causal_mask(doc_ids)
            if groups > 1:  # the masked (efficient / math) kernels want equal head counts
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, nq, L, hd) -> o_proj (B, L, H)."""
        B, _, L, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, nq * hd) -> (B, L, H)
