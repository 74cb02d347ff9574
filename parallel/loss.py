"""Vocab-parallel chunked cross-entropy: the loss of `hidden @ weight.T` when `weight` (lm_head) is
sharded on the vocabulary over the TP group, without ever gathering the logits.

Per chunk of tokens, each rank holds logits for its vocabulary slice only (c, V/tp):
    max      = all-reduce MAX of the local row maxima
    lse      = max + log(all-reduce SUM of the local sum(exp(logit - max)))
    target   = all-reduce SUM of the target logit (non-zero only on the rank owning the label)
    loss     = sum over valid tokens of (lse - target) / number of valid tokens
Gradients are formed in forward, as in jamba/loss.py's fused path: d logits = softmax - onehot (local
slice); d weight_local = g^T h; d hidden = sum over TP ranks of g @ weight_local (one all-reduce at the end).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from jamba.loss import scale_saved_grads
from parallel.dims import ParallelDims


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int, vocab_start: int, group,
                reduce_grad_h: bool = True):
        # hidden (N, H) replicated over the group; weight (V_local, H) this rank's vocab rows; labels (N,)
        V_local = weight.shape[0]
        valid = labels != ignore_index  # (N,)
        n_valid = valid.sum()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h, y, m = hidden[s:s + chunk_size], labels[s:s + chunk_size], valid[s:s + chunk_size]
            logits = F.linear(h, weight).to(acc)  # (c, V_local)
            row_max = logits.max(dim=-1).values  # (c,)
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            local_y = y - vocab_start
            mine = m & (local_y >= 0) & (local_y < V_local)  # (c,) label in this rank's slice
            local_y = torch.where(mine, local_y, torch.zeros_like(local_y))
            logits.sub_(row_max[:, None])
            tgt = logits.gather(1, local_y[:, None]).squeeze(1) * mine  # (c,) shifted target logit
            sums = torch.stack([logits.exp().sum(dim=-1), tgt])  # (2, c)
            dist.all_reduce(sums, group=group)
            lse = sums[0].log()  # (c,) shifted by row_max
            loss_sum += ((lse - sums[1]) * m).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax over the global vocab, local slice (c, V_local)
                rows = torch.arange(g.shape[0], device=g.device)
                g[rows, local_y] -= mine.to(g.dtype)
                g.mul_(m[:, None])
                g = g.to(hidden.dtype)
                if need_h:
                    grad_h[s:s + chunk_size] = g @ weight  # (c, H) partial over the vocab shards
                if need_w:
                    grad_w += (g.t() @ h).to(acc)  # (V_local, H)
        if need_h and reduce_grad_h:  # else the caller's sequence gather reduce-scatters it
            dist.all_reduce(grad_h, group=group)
        n = n_valid.clamp_min(1).to(acc)
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        return (*scale_saved_grads(ctx, grad_out), None, None, None, None, None, None)


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_size: int = 4096, ignore_index: int = -100,
                                 sequence_parallel: bool = False) -> torch.Tensor:
    """Drop-in for `jamba.loss.chunked_cross_entropy` when `weight` is a DTensor sharded on dim 0
    (the vocabulary) over a 1-D mesh. hidden (B, L, H) replicated over the TP group, or with
    `sequence_parallel` this rank's (B, L/tp, H) chunk (gathered here); labels (B, L) long, aligned targets
    (the model shifts HF-style `labels=` before calling its loss_fn, so both conventions arrive aligned)."""
    if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1 or weight.placements[0] != Shard(0):
        raise ValueError("vocab_parallel_cross_entropy needs lm_head.weight as a DTensor Shard(0) on the TP mesh")
    mesh = weight.device_mesh
    V, tp, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    vocab_start = rank * (V // tp)  # ParallelDims checks vocab_size % tp == 0: even shards
    if sequence_parallel:
        from parallel.sequence_parallel import gather_seq
        hidden = gather_seq(hidden, mesh, as_dtensor=False)  # (B, L, H); backward reduce-scatters d hidden
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels = labels.reshape(-1)  # (N,)
    return _VocabParallelCE.apply(hidden, weight.to_local(), labels, chunk_size, ignore_index, vocab_start,
                                  mesh.get_group(), not sequence_parallel)


def apply_vocab_parallel_loss(model: nn.Module, dims: ParallelDims) -> None:
    """lm_head sharded on the vocabulary: the logits path (`model(input_ids)` without labels) gathers the
    logits (ColwiseParallel, output replicated); the loss path uses `vocab_parallel_cross_entropy`
    through the model's `loss_fn` attribute and never gathers them."""
    if not hasattr(model, "loss_fn"):
        raise RuntimeError("JambaForCausalLM has no `loss_fn` attribute: tensor parallelism needs it to swap in "
                           "the vocab-parallel cross-entropy (see parallel/loss.py)")
    sp = dims.cfg.sequence_parallel
    parallelize_module(model.lm_head, dims.get_mesh("tp"),
                       ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate()))
    model.loss_fn = functools.partial(vocab_parallel_cross_entropy, sequence_parallel=sp)
