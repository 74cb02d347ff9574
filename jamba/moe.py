"""Dropless mixture-of-experts FFN (HF JambaSparseMoeBlock): router -> softmax (fp32) -> top-k -> experts.

`MoE.forward` sorts the token copies by expert id and calls `self.experts(x_sorted, num_tokens_per_expert)`.
That call is the seam for expert parallelism: parallel/ may shard `GroupedExperts`' stacked weights on dim 0
and wrap its forward with an all-to-all that re-sorts tokens for the local experts (the experts infer their
local count from `gate_proj.shape[0]`).

Besides the output, `MoE.forward` returns the layer's load-balancing sufficient statistics (see
`STATS_*`), from which the model forms HF's load-balancing loss and the router z-loss after an optional
cross-rank reduction (`JambaForCausalLM.moe_stats_reduce`).
"""

from __future__ import annotations

import logging
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from jamba.config import JambaConfig
from jamba.log_once import LogOnce

logger = logging.getLogger(__name__)
_log_once = LogOnce(logger)

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def moe_stats_width(num_experts: int) -> int:
    """Columns of one layer's statistics row: [counts (E) | prob_sum (E) | z_sum | num_tokens]."""
    return 2 * num_experts + 2


def split_moe_stats(stats: torch.Tensor, num_experts: int):
    """stats (..., 2E+2) -> counts (..., E), prob_sum (..., E), z_sum (...), num_tokens (...)."""
    E = num_experts
    return stats[..., :E], stats[..., E:2 * E], stats[..., 2 * E], stats[..., 2 * E + 1]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, index, back_index, fold: int):
        ctx.save_for_backward(back_index)
        ctx.fold = fold
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back_index,) = ctx.saved_tensors
        g = grad.index_select(0, back_index)  # a gather: no atomics, deterministic
        if ctx.fold > 1:
            g = g.view(-1, ctx.fold, g.shape[-1]).sum(1)  # the fold copies of each source row, summed in fp32
        return g, None, None, None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """A permutation (n,) -> its inverse (inv[order[j]] = j), on the device: the back_index with which
    `gather_rows` reorders rows back by a gather. On GPUs that is several times faster than `index_copy` by `order`
    (and than index_select's backward, an index_add): on one H200 the sized EP exchange's two such copies took
    0.58 ms per bench-3b MoE layer (launch/bench_ep_layer.py --profile)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def gather_rows(src: torch.Tensor, index: torch.Tensor, back_index: torch.Tensor, fold: int = 1) -> torch.Tensor:
    """`src.index_select(0, index)` (src (S, H), index (S * fold,)) where every source row is picked exactly
    `fold` times, with a backward that gathers instead of scatter-adding (index_select's backward is an
    atomic index_add): grad_src[s] = sum_j grad[back_index[s * fold + j]], i.e. `back_index` lists, for each
    source row in turn, the `fold` output positions that copied it (the inverse permutation of `index`
    when fold = 1)."""
    return _GatherRows.apply(src, index, back_index, fold)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights in nn.Linear orientation (out x in):
    gate_proj (E, I, H), up_proj (E, I, H), down_proj (E, H, I).

    forward(x (T, H) sorted by expert, num_tokens_per_expert (E_local,) long) -> (T, H).
    CUDA + bf16 + torch._grouped_mm: one grouped GEMM per projection; otherwise an exact per-expert loop.
    With padded=True, rows after the last expert's (T > sum of the counts) are padding: their output is zero
    and they pass no gradient (expert parallelism's fixed-size exchange sends such rows,
    parallel/expert_parallel.py); the GEMMs skip them.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, padded: bool = False) -> torch.Tensor:
        n_local = self.gate_proj.shape[0]
        if num_tokens_per_expert.shape[0] != n_local:
            raise ValueError(f"GroupedExperts holds {n_local} experts but got token counts for "
                             f"{num_tokens_per_expert.shape[0]}; pass one count per local expert")
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # _grouped_mm is not on autocast's cast list: cast as autocast casts the loop's F.linear inputs.
            x = x.to(torch.get_autocast_dtype("cuda"))
        if x.shape[0] == 0:  # an expert-parallel rank that received no tokens: the loop's empty matmuls
            return self._loop(x, num_tokens_per_expert, padded)  # give zero gradients; _grouped_mm's backward fails
        if x.is_cuda and HAS_GROUPED_MM and x.dtype == torch.bfloat16:
            _log_once("gmm", "MoE experts: torch._grouped_mm (CUDA, bf16)")
            return self._grouped_mm(x, num_tokens_per_expert, padded)
        _log_once(f"loop-{x.device.type}", f"MoE experts: per-expert loop on {x.device.type} ({x.dtype})"
                  + ("" if not x.is_cuda else "; torch._grouped_mm needs bf16 and torch>=2.8"))
        return self._loop(x, num_tokens_per_expert, padded)

    def _grouped_mm(self, x: torch.Tensor, counts: torch.Tensor, padded: bool = False) -> torch.Tensor:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,) end offset of each group
        dt = x.dtype
        if padded:  # rows past offs[-1]: the grouped GEMMs leave them unwritten, forward and backward, so mask
            # both ends without reading the offset on the host (where, not a product: they may hold NaNs)
            valid = (torch.arange(x.shape[0], device=x.device) < offs[-1]).unsqueeze(-1)  # (T, 1)
            x = torch.where(valid, x, x.new_zeros(()))  # its backward: no gradient into padding rows
        g = torch._grouped_mm(x, self.gate_proj.to(dt).transpose(-2, -1), offs=offs)  # (T, I)
        u = torch._grouped_mm(x, self.up_proj.to(dt).transpose(-2, -1), offs=offs)  # (T, I)
        h = F.silu(g) * u
        y = torch._grouped_mm(h, self.down_proj.to(dt).transpose(-2, -1), offs=offs)  # (T, H)
        return torch.where(valid, y, y.new_zeros(())) if padded else y

    def _loop(self, x: torch.Tensor, counts: torch.Tensor, padded: bool = False) -> torch.Tensor:
        sizes = counts.tolist()  # one host sync for the split sizes
        pad = x.shape[0] - sum(sizes)
        if pad < 0 or (pad and not padded):
            raise ValueError(f"GroupedExperts: the counts sum to {sum(sizes)} rows but x has {x.shape[0]} "
                             "(more rows are allowed only with padded=True)")
        outs = []
        for e, xe in enumerate(x.split(sizes + [pad])[:len(sizes)]):
            h = F.silu(F.linear(xe, self.gate_proj[e])) * F.linear(xe, self.up_proj[e])  # (T_e, I)
            outs.append(F.linear(h, self.down_proj[e]))  # (T_e, H)
        if pad:
            outs.append((outs[0] if outs else x).new_zeros(pad, self.down_proj.shape[1]))
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


class MoE(nn.Module):
    """Router (Linear H -> E, no bias) + GroupedExperts. Top-k of the fp32 softmax, renormalised only if
    cfg.moe_renormalize (Jamba: not). Dropless: every token copy is computed. With
    cfg.moe_router_bias_update_rate > 0 the top-k is taken of the probabilities plus `expert_bias` (the
    weights stay the probabilities), and `update_expert_bias` moves the bias after each optimizer step."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.renormalize = cfg.moe_renormalize
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size)
        self.token_chunk = cfg.moe_token_chunk
        self.force_balance = cfg.moe_force_balance
        if cfg.moe_router_bias_update_rate > 0:  # auxiliary-loss-free balancing (JambaConfig): top-k choice only
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)` and the like cast buffers too; the bias stays at least fp32 (its steps
        of 1e-3 vanish in bf16 once it exceeds 0.25, and a rounded bias flips near-tie choices)."""
        super()._apply(fn, recurse)
        b = self.expert_bias
        if b is not None and b.is_floating_point() and b.element_size() < 4:
            self._buffers["expert_bias"] = b.float()
        return self

    def reset_parameters(self) -> None:
        """The router and experts are initialised by the model's init table; the bias starts at zero."""
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor, rate: float) -> None:
        """counts (E,): this layer's token copies per expert over an optimizer step, global (identical on every
        rank, so every replica's bias stays the same). bias += rate * sign(mean - count), recentred to mean 0
        (the top-k choice ignores a common shift; recentring keeps long runs from drifting)."""
        if self.expert_bias is None:
            raise ValueError("this MoE layer has no expert bias: build it with model.moe_router_bias_update_rate > 0")
        if counts.shape != self.expert_bias.shape:
            raise ValueError(f"counts has shape {tuple(counts.shape)}; give one count per expert, "
                             f"({self.num_experts},)")
        c = counts.to(self.expert_bias.dtype)
        delta = rate * torch.sign(c.mean() - c)
        self.expert_bias.add_(delta - delta.mean())

    def forward(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, H) -> (out (B, L, H), stats (2E+2,) fp32 (fp64 for fp64 models): [counts | prob_sum | z_sum | num_tokens])."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (N, H)
        c = self.token_chunk
        if not c or x.shape[0] <= c:
            out, stats = self._route_and_compute(x)
            return out.view(shape), stats
        # Token chunks, each recomputed on its own in backward: only one chunk's (c*k, I) expert activations
        # are alive at a time. The statistics are sums over tokens, so adding the chunks' is exact.
        outs, stats = [], None
        for xc in x.split(c):
            o, s = checkpoint(self._route_and_compute, xc, use_reentrant=False)
            outs.append(o)
            stats = s if stats is None else stats + s
        return torch.cat(outs).view(shape), stats

    def _route_and_compute(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> (out (N, H), stats (2E+2,))."""
        N, E, k = x.shape[0], self.num_experts, self.top_k
        logits = self.router(x)  # (N, E), model dtype
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        probs = torch.softmax(logits32, dim=-1)  # (N, E)
        if self.force_balance:  # benchmarking: round-robin experts, E | N*k copies each get N*k/E
            top_i = (torch.arange(N * k, device=x.device) % E).view(N, k)  # (N, k)
            top_w = probs.gather(1, top_i)
        elif self.expert_bias is not None:  # the bias steers the choice; the weights stay the probabilities
            top_i = torch.topk(probs + self.expert_bias.to(probs.dtype), k, dim=-1).indices  # (N, k)
            top_w = probs.gather(1, top_i)
        else:
            top_w, top_i = torch.topk(probs, k, dim=-1)  # (N, k)
        if self.renormalize:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        flat_e = top_i.reshape(-1)  # (N*k,) expert of each token copy
        order = torch.argsort(flat_e, stable=True)  # token copies sorted by expert
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_e, torch.ones_like(flat_e))  # (E,) no host sync
        inverse = inverse_permutation(order)
        x_sorted = gather_rows(x, order // k, inverse, fold=k)  # (N*k, H)
        y_sorted = self.experts(x_sorted, counts)  # (N*k, H)
        y = gather_rows(y_sorted, inverse, order).view(N, k, -1)  # (N, k, H) back in token order
        out = (y * top_w.to(y.dtype).unsqueeze(-1)).sum(dim=1)  # (N, H)

        z_sum = torch.logsumexp(logits32, dim=-1).pow(2).sum()
        stats = torch.cat([counts.to(probs.dtype), probs.sum(dim=0), z_sum.view(1),
                           torch.full((1,), float(N), dtype=probs.dtype, device=x.device)])  # (2E+2,)
        return out, stats


def load_balancing_loss(stats: torch.Tensor, num_experts: int) -> torch.Tensor:
    """HF's `load_balancing_loss_func` from the stacked per-layer statistics (num_moe_layers, 2E+2):
    E * sum_e (sum_l count[l,e] / T) * (sum_l prob_sum[l,e] / T), T = sum_l num_tokens[l]
    (HF concatenates the router logits of all MoE layers; counts are top-k assignments)."""
    counts, prob_sum, _, n = split_moe_stats(stats, num_experts)
    total = n.sum()
    return num_experts * torch.sum((counts.sum(0) / total) * (prob_sum.sum(0) / total))


def router_z_loss(stats: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens (and MoE layers) of logsumexp(router_logits)^2."""
    _, _, z_sum, n = split_moe_stats(stats, num_experts)
    return z_sum.sum() / n.sum()
