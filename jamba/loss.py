"""Chunked cross-entropy: the mean CE of `hidden @ weight.T` against labels without ever holding the
[tokens, vocab] logits, in forward or backward.

Two implementations, same value as `F.cross_entropy(logits.float(), labels, ignore_index=-100)`:
- "fused" (default for plain tensors): a custom autograd Function that, chunk by chunk, computes the logits
  (fp32 straight from the GEMM accumulator on CUDA), the loss and at once the gradients w.r.t. the chunk's
  hidden states and the weight (softmax - onehot, in the model dtype for the two GEMMs), so only
  (chunk, vocab) logits exist at any time and backward is a scaling of the saved gradients. Extra memory: grad of hidden (N, H) in its dtype + grad of weight (V, H)
  in fp32.
- "checkpoint": each chunk's loss under non-reentrant activation checkpointing (recomputes the chunk's
  logits in backward). Used for tensor subclasses (e.g. DTensor under tensor parallelism), where autograd
  through ordinary ops is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF causal-LM labels -> aligned targets: targets[:, t] = labels[:, t + 1], the last position ignored.
    labels (B, L) -> (B, L). This is what transformers' ForCausalLMLoss does before its cross-entropy."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _cuda_out_dtype_mm() -> bool:
    """torch.mm(a, b, out_dtype=torch.float32) on bf16 CUDA tensors (torch >= 2.8): fp32 output straight
    from the GEMM's fp32 accumulator, no bf16 round trip and no extra copy."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


_OUT_DTYPE_MM = None


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b returned in dtype `acc` (fp32 or fp64), straight from the accumulator where possible."""
    global _OUT_DTYPE_MM
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and acc == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        if _OUT_DTYPE_MM is None:
            _OUT_DTYPE_MM = _cuda_out_dtype_mm()
        if _OUT_DTYPE_MM:
            return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(acc)


def _logits_fp32(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _mm_acc(h, weight.t(), torch.promote_types(h.dtype, torch.float32))


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = _upcast(F.linear(h, weight))  # (c, V) fp32 for this chunk only
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def softmax_xent_grad(logits: torch.Tensor, y_safe: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype):
    """One chunk's summed CE and its logits gradient, written element-wise so that `torch.compile` fuses it
    into two passes over the (c, V) fp32 logits (`parallel.compile.apply_compile` installs the compiled
    form). logits (c, V) fp32; y_safe (c,) targets (any value where not valid); valid (c,) bool.
    Returns (sum over valid rows of lse - logit[target] (fp32 scalar), (softmax - onehot) * valid in `dtype`)."""
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    tgt = logits.gather(1, y_safe[:, None]).squeeze(1)  # (c,)
    loss_sum = ((lse - tgt) * valid).sum()
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == y_safe[:, None]  # (c, V), fused
    g = (torch.exp(logits - lse[:, None]) - onehot.to(logits.dtype)) * valid[:, None]
    return loss_sum, g.to(dtype)


class _FusedChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int, chunk_fn=None):
        # hidden (N, H), weight (V, H), labels (N,)
        valid = labels != ignore_index  # (N,)
        n_valid = valid.sum()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h, y, m = hidden[s:s + chunk_size], labels[s:s + chunk_size], valid[s:s + chunk_size]
            logits = _logits_fp32(h, weight)  # (c, V) fp32 (fp64 stays fp64)
            y_safe = torch.where(m, y, torch.zeros_like(y))
            if chunk_fn is not None:  # e.g. the compiled softmax_xent_grad: rows already masked in g
                part, g = chunk_fn(logits, y_safe, m, hidden.dtype)
                del logits
                loss_sum += part
                if need_h:
                    grad_h[s:s + chunk_size] = g @ weight
                if need_w:
                    grad_w += _mm_acc(g.t(), h, acc)
                continue
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            tgt = logits.gather(1, y_safe[:, None]).squeeze(1)  # (c,)
            loss_sum += ((lse - tgt) * m).sum()
            if need_h or need_w:
                g = torch.softmax(logits, dim=-1)  # (c, V) one pass; the logits are freed below
                del logits
                g[torch.arange(g.shape[0], device=g.device), y_safe] -= 1.0  # softmax - onehot
                g = g.to(hidden.dtype)
                mh = m[:, None].to(hidden.dtype)  # ignored tokens: zero rows, applied on (c, H) not (c, V)
                if need_h:
                    grad_h[s:s + chunk_size] = (g @ weight) * mh  # (c, H)
                if need_w:
                    grad_w += _mm_acc(g.t(), h * mh, acc)  # (V, H), accumulated in fp32
        n = n_valid.clamp_min(1).float()
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.weight_dtype = weight.dtype
        loss = loss_sum / n_valid.float()  # nan if nothing is valid, like F.cross_entropy
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        return (*scale_saved_grads(ctx, grad_out), None, None, None, None)


def scale_saved_grads(ctx, grad_out):
    """Backward of a loss whose forward saved (grad_h, grad_w, n_valid) of the summed loss: scale them by
    grad_out / n_valid (shared with parallel/loss.py's vocab-parallel variant)."""
    grad_h, grad_w, n = ctx.saved_tensors
    scale = grad_out / n
    gh = (grad_h * scale.to(grad_h.dtype)) if grad_h is not None else None
    gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
    return gh, gw


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 4096, ignore_index: int = -100, impl: str = "auto",
                          chunk_fn=None) -> torch.Tensor:
    """Mean CE over labels != ignore_index of logits = hidden @ weight.T, computed `chunk_size` tokens at a
    time. hidden (..., H), weight (V, H), labels (...) long. impl: "auto" | "fused" | "checkpoint".
    chunk_fn: for "fused", a replacement of `softmax_xent_grad` (its compiled form) for every chunk."""
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels = labels.reshape(-1)  # (N,)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} tokens but hidden states {hidden.shape[0]}")
    if impl == "auto":
        plain = type(hidden) in (torch.Tensor, torch.nn.Parameter) and type(weight) in (torch.Tensor,
                                                                                        torch.nn.Parameter)
        impl = "fused" if plain else "checkpoint"
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:  # evaluation: plain chunk loop, nothing saved
        total = sum(_chunk_loss_sum(hidden[s:s + chunk_size], weight, labels[s:s + chunk_size], ignore_index)
                    for s in range(0, hidden.shape[0], chunk_size))
        return total / (labels != ignore_index).sum()
    if impl == "fused":
        return _FusedChunkedCE.apply(hidden, weight, labels, chunk_size, ignore_index, chunk_fn)
    if impl != "checkpoint":
        raise ValueError(f"chunked_cross_entropy impl={impl!r}: use 'auto', 'fused' or 'checkpoint'")
    total = None
    for s in range(0, hidden.shape[0], chunk_size):
        part = checkpoint(_chunk_loss_sum, hidden[s:s + chunk_size], weight, labels[s:s + chunk_size],
                          ignore_index, use_reentrant=False)
        total = part if total is None else total + part
    return total / (labels != ignore_index).sum()

