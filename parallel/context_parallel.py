"""Context parallelism (`parallel.cp`): one sequence split across the cp ranks in every layer, exact
against one process.

Layout. Each cp rank holds L/cp contiguous tokens of every row (rank c: positions [c L/cp, (c+1) L/cp)).
The data loader gives all cp ranks of a data-parallel group the same rows (ParallelDims.dp_rank ignores
cp); `shard_inputs` (a forward pre-hook on the model) keeps this rank's slice of `input_ids` and of the
already aligned `labels` (target t is token t+1 of the packed row, shifted before slicing, so the label of
a chunk's last token is the first token of the next chunk). `doc_ids` stay whole: attention needs the
whole row's documents, Mamba ignores them. (Without labels the model returns this rank's (B, L/cp, V)
logits.) Parameters stay replicated over cp (FSDP2 shards them over
dp_shard x cp, as torchtitan does), so each rank's gradient is a partial sum and FSDP's mean over the
dp_shard x cp ranks is the single-process gradient (see "Gradients" below).

Per layer kind (the model code is unchanged; its mixers expose seams that this module wraps per instance):

    Mamba-1   in_proj on the local tokens -> x, z (B, Di, L/cp)
              all-to-all sequence -> channel: x, z (B, Di/cp, L)      whole sequence, a channel slice
              causal conv + SiLU on the slice (no halo: every channel has its whole sequence)
              x_proj with its input columns of the slice: partial [dt, B, C] (B, L, R+2N), summed over cp
              (in the activation dtype, bf16 under autocast, as TP's row-wise layers do)
              dt/B/C norms (replicated), dt_proj rows / A_log / D / conv / dt bias of the slice
              selective scan unchanged (the CUDA kernels as they are) -> y (B, Di/cp, L)
              all-to-all channel -> sequence: y (B, Di, L/cp); out_proj on the local tokens
    Mamba-2   in_proj on the local tokens -> z, xBC, dt; z stays (the gated norm runs on the local tokens)
              all-to-all sequence -> heads: x with dt (B, L/cp, H, P + 1) -> (B, L, H/cp, P + 1), and where
              cp divides G, B and C by groups in the same exchange (each rank's heads read G/cp groups of
              their own); where G divides cp, all-gather of B and C along the sequence, each rank keeping
              the one group its heads read
              causal conv + SiLU and the SSD unchanged on the whole sequence for the rank's heads (conv
              channels, A_log, D and dt_bias sliced to them) -> y (B, L, Di/cp)
              all-to-all heads -> sequence: y (B, L/cp, Di); gated norm with z, out_proj on the local tokens
    attention q/k/v_proj on the local tokens; DeepSpeed-Ulysses-style all-to-all sequence -> heads:
              (B, heads, L/cp, hd) -> (B, heads/cp, L, hd); the model's own `_attend` (causal or document
              mask, RoPE positions, GQA) runs on the whole sequence for its heads; all-to-all back; o_proj.
              kv heads: sharded when cp divides them, repeated to cp heads when cp is a multiple of them.
              Where cp does not divide the (local) query heads: all-gather of K and V along the sequence
              (queries against the keys up to the last of them: a lower-right causal bias, not materialised;
              with document masking an explicit mask), causally load-balanced by pairing rank c with
              cp - 1 - c: each computes the second half of its partner's queries
    MoE / MLP per token: unchanged (EP, TP compose). Router statistics are all-reduced over "dp_cp"
              (parallel/expert_parallel.py), so the load-balancing and z losses are the global ones.
    loss      each rank's chunked CE over its tokens, rescaled by (its valid tokens) * cp / (the cp group's
              valid tokens): the mean over cp ranks of the rescaled losses is the row's mean CE exactly.

Gradients. Let T = sum over the cp ranks of their (rescaled) losses = cp x the single-process loss of the
rows. Every collective has the adjoint of its forward (all-to-all <-> inverse all-to-all; x_proj's sum
-> sum of the gradients, since every rank consumes the whole [dt, B, C] for its channels; Mamba-2's all-gather
of B and C -> the sum of all ranks' gradients, this rank's chunk), so a parameter's
gradients on the cp ranks sum to dT/dtheta; FSDP averages over dp_shard x cp, i.e. divides by cp: the
single-process gradient. Channel-sliced parameters get non-zero gradient only on their slice per rank.

Why the all-to-all (design (a)) and not state passing (b) for Mamba-1:
  (a) moves, per Mamba layer and pass, x and z (2 Di/tp channels) and y (Di/tp) of the local tokens by
      all-to-all ((cp-1)/cp of them leave the rank) and the small [dt, B, C] (R + 2N per token) by all-reduce;
      attention moves q, k, v and its output. `traffic_per_step` counts it (and is checked against the bytes
      really sent): bench-3b at 1M tokens, cp=2, activation checkpointing, bf16: 267 GiB of all-to-all (252
      from the 14 Mamba layers, 15 from the 2 attention layers) and 13 GiB of all-reduce per rank and step. Against a step of ~35 PFLOP (jamba.flops; two attention layers
      at 1M tokens dominate), i.e. tens of seconds on two H200s, ~0.8 s of NVLink traffic is a few percent
      (an estimate: launch/bench_cp.py measures tokens/s and the NCCL share). It needs no kernel change
      (conv and scan see whole sequences), no halo, and scales to cp up to d_inner / tp (8192 at Jamba's
      size), far beyond any head count.
  (b) sends only the chunk-final states (B, Di, N) and a conv halo per layer (~12 MiB per step for the same
      bench-3b run), but the scan kernels would have to take an initial state, return the final one, and
      pass the state gradient back; combining the states over ranks is sequential (or a prefix scan over
      cp) and every rank then corrects its outputs with the incoming state, a second pass of the scan. It
      wins when cp crosses nodes (inter-node bandwidth is ~10x lower); it is the follow-up, behind a kernel
      change in jamba/ops (an initial-state scan), not done here.
  At cp <= 8 within one NVLink node (a) is the simpler exact design and keeps our CUDA scan unchanged.
  Measured (launch/bench_cp.py --profile, bench-3b at 1M tokens, cp=2 on 2 H200s): all of cp's collectives
  are 2.0% of the step, which bounds what (b) could save inside a node.

Why our own all-to-all instead of deepspeed's `DistributedAttention`: the exchange is ~20 lines of eager
c10d with the adjoint stated (`all_to_all` below), it is shared by the Mamba and attention layers, works on
gloo for the CPU tests, composes with our TP head shards and kv-head repetition, and keeps deepspeed an
optional dependency (it is not installed on CPU). DeepSpeed's layer does the same exchange.

Mamba-2 takes design (a) too, by heads (the SSD's unit). B and C belong to groups of heads: where cp
divides G each rank's heads read their own G/cp groups, which travel with x and dt in one all-to-all; where
G divides cp (e.g. mamba-ssm's default of one group) ranks share a group, so B and C are all-gathered whole
(2 G N per token against x's Di). Not tensor-parallel (ParallelDims refuses tp > 1 with
Mamba-2), so its slices are of the whole mixer; cp can go up to the head count.
"""

from __future__ import annotations

import inspect
import logging
from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from jamba.mamba import conv_ssd
from parallel.collectives import reduce_from_group
from parallel.dims import ParallelDims, ulysses_heads

logger = logging.getLogger(__name__)


# ---- collectives ---------------------------------------------------------------------------------
TRAFFIC = {"all_to_all": 0, "all_reduce": 0, "all_gather": 0}
"""Bytes this process has sent through context parallelism's all-to-alls, x_proj sums and sequence
all-gathers (Mamba-2's B/C, attention's K/V fallback) with their backward sums (forward, backward and
recomputation alike; an all-to-all sends (n-1)/n of its buffer, a ring all-reduce 2 (n-1)/n of it, a ring
all-gather (n-1)/n of its output). Host-side
arithmetic only. launch/bench_cp.py reports it per step; `traffic_per_step` predicts it."""


def _count(kind: str, t: torch.Tensor, n: int, factor: float = 1.0) -> None:
    TRAFFIC[kind] += int(t.numel() * t.element_size() * factor * (n - 1) / n)


def _exchange(xs, scatter_dim: int, gather_dim: int, group, n: int):
    """For each of the same-shape tensors xs: split it into n chunks along scatter_dim, send chunk j to rank j,
    concatenate the received chunks along gather_dim in rank order. One all-to-all for all of them: each
    element is copied once into the send buffer and once out of the receive buffer (outputs contiguous)."""
    x0 = xs[0]
    chunk = x0.unflatten(scatter_dim, (n, x0.shape[scatter_dim] // n)).movedim(scatter_dim, 0).shape  # (n, ...)
    send = x0.new_empty((chunk[0], len(xs)) + tuple(chunk[1:]))  # (n, k, ...)
    for i, x in enumerate(xs):
        send[:, i].copy_(x.unflatten(scatter_dim, (n, x.shape[scatter_dim] // n)).movedim(scatter_dim, 0))
    recv = torch.empty_like(send)  # recv[j]: the chunks rank j sent to me
    dist.all_to_all_single(recv, send, group=group)
    _count("all_to_all", send, n)
    del send
    return [recv[:, i].movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1) for i in range(len(xs))]


class _AllToAll(torch.autograd.Function):
    """fwd: scatter `scatter_dim`, gather `gather_dim` over the group, for several same-shape tensors at
    once. bwd: the inverse exchange of their gradients."""

    @staticmethod
    def forward(ctx, scatter_dim: int, gather_dim: int, group, n: int, *xs):
        ctx.args = (scatter_dim, gather_dim, group, n)
        return tuple(_exchange(xs, scatter_dim, gather_dim, group, n))

    @staticmethod
    def backward(ctx, *gs):
        scatter_dim, gather_dim, group, n = ctx.args
        ref = next(g for g in gs if g is not None)
        gs = [g if g is not None else torch.zeros_like(ref) for g in gs]
        return (None, None, None, None, *_exchange(gs, gather_dim, scatter_dim, group, n))


def all_to_all(xs, scatter_dim: int, gather_dim: int, group, n: int):
    """Differentiable all-to-all of one tensor or a list of same-shape tensors (one collective), e.g.
    (B, C, L/n) with scatter_dim=1, gather_dim=2 -> (B, C/n, L). Returns a tensor or a list, as given."""
    single = isinstance(xs, torch.Tensor)
    xs = [xs] if single else list(xs)
    for x in xs:
        if x.shape != xs[0].shape or x.shape[scatter_dim] % n:
            raise ValueError(f"context parallelism: cannot exchange shapes {[tuple(t.shape) for t in xs]} over "
                             f"cp={n} (dim {scatter_dim} must be divisible by cp, shapes equal)")
    out = _AllToAll.apply(scatter_dim, gather_dim, group, n, *xs)
    return out[0] if single else list(out)


class _CpSum(torch.autograd.Function):
    """x_proj's partial products summed over the cp group. fwd: sum. bwd: sum (every rank consumes the whole
    [dt, B, C] for its own channels, so the gradient of each partial is the sum of all ranks' gradients)."""

    @staticmethod
    def forward(ctx, x, group, n: int):
        ctx.args = (group, n)
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        _count("all_reduce", x, n, 2.0)
        return x

    @staticmethod
    def backward(ctx, g):
        group, n = ctx.args
        g = g.contiguous().clone()
        dist.all_reduce(g, group=group)
        _count("all_reduce", g, n, 2.0)
        return g, None, None


class _GatherSeq(torch.autograd.Function):
    """fwd: all-gather along `dim` (rank order). bwd: the sum over ranks of the gradient, this rank's chunk
    (a reduce-scatter, written as all-reduce + slice because gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim: int, group, n: int, rank: int):
        ctx.args = (dim, group, n, rank)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x, group=group)
        out = torch.cat(parts, dim=dim)
        _count("all_gather", out, n)
        return out

    @staticmethod
    def backward(ctx, g):
        dim, group, n, rank = ctx.args
        g = g.contiguous().clone()
        dist.all_reduce(g, group=group)
        _count("all_reduce", g, n, 2.0)
        return g.chunk(n, dim=dim)[rank].contiguous(), None, None, None, None


# ---- helpers -------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor parameter (tensor-parallel shard), differentiably; else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def _owner(module: nn.Module, path: str):
    *mods, name = path.split(".")
    for m in mods:
        module = getattr(module, m)
    return module, name


class _Cp:
    """The cp group of this rank: its process group, size and index."""

    def __init__(self, dims: ParallelDims):
        mesh = dims.get_mesh("cp")
        self.group, self.n, self.rank = mesh.get_group(), dims.cp, mesh.get_local_rank()
        self.tp_group = dims.get_mesh("tp").get_group() if dims.tp > 1 else None

    def chunk(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(self.n, dim=dim)[self.rank]


# ---- Mamba-1 -------------------------------------------------------------------------------------
_MAMBA_CHANNEL_ROWS = ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D")


def apply_cp_mamba1(mixer: nn.Module, cp: _Cp) -> None:
    """Sequence <-> channel all-to-all around the conv and scan of a Mamba1Mixer (see the module docstring).
    Composes with tensor parallelism: the channel slices are taken of the TP-local d_inner shard."""
    rows = [p for p in _MAMBA_CHANNEL_ROWS if getattr(_owner(mixer, p)[0], _owner(mixer, p)[1]) is not None]
    in_proj, out_proj = mixer._in_proj, mixer._out_proj

    def pre_hook(mod, args):
        # after FSDP's unshard and TP's LocalParams: slice whatever the forward would read (a full parameter
        # or a TP-local view) to this rank's channels; the forward then reads the slice from __dict__
        for path in rows:
            owner, name = _owner(mod, path)
            owner.__dict__[name] = cp.chunk(_local(getattr(owner, name)), 0)

    def post_hook(mod, args, out):
        for path in rows:
            owner, name = _owner(mod, path)
            owner.__dict__.pop(name, None)

    def cp_in_proj(hidden):  # hidden (B, L/cp, H) -> x, z (B, Di/cp, L)
        x, z = in_proj(hidden)  # (B, Di, L/cp) each
        x, z = all_to_all([x, z], 1, 2, cp.group, cp.n)  # (B, Di/cp, L) each
        return x.contiguous(), z  # (contiguous already: the receive buffer is copied out)

    def cp_x_proj(x):  # x (B, Di/cp, L) -> [dt, B, C] (B, L, R + 2N), the sum over every channel
        w = cp.chunk(_local(mixer.x_proj.weight), 1)  # (R + 2N, Di/cp) columns of this rank's channels
        part = F.linear(x.transpose(1, 2), w)
        if cp.tp_group is not None:  # TP's row-wise x_proj: sum over the TP shards, gradient replicated
            part = reduce_from_group(part, cp.tp_group)
        return _CpSum.apply(part, cp.group, cp.n)

    def cp_out_proj(y, dtype):  # y (B, Di/cp, L) -> (B, L/cp, H)
        return out_proj(all_to_all(y, 2, 1, cp.group, cp.n), dtype)

    mixer.register_forward_pre_hook(pre_hook)
    mixer.register_forward_hook(post_hook, always_call=True)
    mixer._in_proj, mixer._x_proj, mixer._out_proj = cp_in_proj, cp_x_proj, cp_out_proj


# ---- Mamba-2 -------------------------------------------------------------------------------------
def mamba2_groups(nheads: int, ngroups: int, cp: int, rank: int):
    """The B/C groups [g0, g1) that cp rank `rank`'s heads [rank H/cp, (rank+1) H/cp) read (head h reads
    group h // (H/G)); None where the heads of a rank do not map onto whole groups or one group in order
    (then cp must divide G, or G divide cp)."""
    if nheads % cp or not (ngroups % cp == 0 or cp % ngroups == 0):
        return None
    per_rank, per_group = nheads // cp, nheads // ngroups
    g0 = rank * per_rank // per_group
    return g0, max(g0 + 1, (rank + 1) * per_rank // per_group)


def apply_cp_mamba2(mixer: nn.Module, cp: _Cp) -> None:
    """Sequence <-> head all-to-all around a Mamba2Mixer's conv and SSD (`_conv_ssd`): in_proj, the gated
    norm and out_proj stay on the local tokens (z never moves); x and dt go to head shards of the whole
    sequence (B, L/cp, Di) -> (B, L, Di/cp). B and C (G N channels each): where cp divides G every rank's
    heads read G/cp groups of their own, and those travel in the same all-to-all (by groups); where G divides
    cp (e.g. one group) ranks share groups, so B and C are all-gathered along the sequence and each rank keeps
    the group its heads read. Conv + SSD run unchanged on whole sequences (no halo, no state passing); y
    comes back by the inverse all-to-all. Parameters of the conv channels, A_log, D and dt_bias are sliced
    to the rank's heads and groups (gradient only there; a group shared by several ranks gets the sum of
    their parts, as Mamba-1's x_proj)."""
    H, G, N, Di = mixer.nheads, mixer.ngroups, mixer.d_state, mixer.d_inner
    g0, g1 = mamba2_groups(H, G, cp.n, cp.rank)
    di, gl, by_groups = Di // cp.n, g1 - g0, G % cp.n == 0
    # conv channels of this rank, three contiguous ranges: its x channels, then its groups' B and C channels
    ranges = [(cp.rank * di, di), (Di + g0 * N, gl * N), (Di + G * N + g0 * N, gl * N)]

    def rows(t):  # (conv_dim, ...) -> this rank's channels, differentiably (no index tensor, no host copy)
        return torch.cat([t.narrow(0, start, n) for start, n in ranges])

    def cp_conv_ssd(xBC, dt):  # xBC (B, L/cp, Di + 2 G N), dt (B, L/cp, H) -> y (B, L/cp, Di)
        x, bc = torch.split(xBC, [Di, 2 * G * N], dim=-1)
        # per destination rank: its heads' x with dt (H/cp (P + 1)), and by groups its B and C (2 G/cp N)
        xdt = torch.cat([x.unflatten(-1, (H, -1)), dt.unsqueeze(-1)], dim=-1).flatten(-2)  # (B, L/cp, H (P+1))
        parts = [xdt.unflatten(-1, (cp.n, -1))]  # (B, L/cp, cp, H/cp (P + 1))
        if by_groups:
            parts += [t.unflatten(-1, (cp.n, -1)) for t in bc.split(G * N, dim=-1)]  # (B, L/cp, cp, G/cp N) x 2
        recv = all_to_all(torch.cat(parts, dim=-1), 2, 1, cp.group, cp.n).squeeze(2)  # (B, L, ...) one exchange
        hp = H // cp.n * (mixer.head_dim + 1)
        if by_groups:
            xdt, b, c = torch.split(recv, [hp, gl * N, gl * N], dim=-1)  # B and C: (B, L, gl N) each
        else:  # ranks share groups: gather B and C whole along the sequence, keep this rank's group
            xdt = recv
            b, c = _GatherSeq.apply(bc, 1, cp.group, cp.n, cp.rank).split(G * N, dim=-1)  # (B, L, G N) each
            b, c = b[..., g0 * N:g1 * N], c[..., g0 * N:g1 * N]
        xdt = xdt.unflatten(-1, (H // cp.n, -1))  # (B, L, H/cp, P + 1)
        x, dt = xdt[..., :-1].flatten(-2), xdt[..., -1]  # (B, L, di), (B, L, H/cp)
        xbc = torch.cat([x, b, c], dim=-1)  # (B, L, di + 2 gl N)
        w = rows(mixer.conv1d.weight.squeeze(1))
        bias = rows(mixer.conv1d.bias) if mixer.conv1d.bias is not None else None
        y = conv_ssd(xbc, dt, w, bias, cp.chunk(mixer.A_log, 0), cp.chunk(mixer.D, 0), cp.chunk(mixer.dt_bias, 0),
                     gl, N, mixer.head_dim, mixer.chunk_size)  # (B, L, di)
        return all_to_all(y, 1, 2, cp.group, cp.n)  # (B, L/cp, Di)

    mixer._conv_ssd = cp_conv_ssd


# ---- attention -----------------------------------------------------------------------------------
def apply_cp_attention(attn: nn.Module, cp: _Cp) -> None:
    """Ulysses all-to-all around the model's `_attend`, or the all-gather-KV fallback."""
    attend = attn._attend
    logged = []

    def cp_attend(q, k, v, doc_ids):
        # q (B, nq, L/cp, hd), k/v (B, nkv, L/cp, hd) local tokens; doc_ids (B, L) whole rows or None
        mode = ulysses_heads(q.shape[1], k.shape[1], cp.n)
        if not logged:
            logged.append(mode)
            logger.info("context-parallel attention layer %d: %s", attn.layer_idx,
                        f"Ulysses all-to-all (kv heads {mode})" if mode else "all-gather of K and V")
        if mode is None:
            return _allgather_kv_attend(attn, q, k, v, doc_ids, cp)
        if mode == "repeat":  # kv head j of the cp slots is the original head j * nkv // cp (GQA order kept)
            k, v = (t.repeat_interleave(cp.n // k.shape[1], dim=1) for t in (k, v))
        q = all_to_all(q, 1, 2, cp.group, cp.n)  # (B, nq/cp, L, hd)
        k, v = all_to_all([k, v], 1, 2, cp.group, cp.n)  # (B, nkv/cp, L, hd); kv heads as repeated above
        y = attend(q, k, v, doc_ids)  # (B, nq/cp, L, hd)
        return all_to_all(y, 2, 1, cp.group, cp.n)  # (B, nq, L/cp, hd)

    attn._attend = cp_attend


class _Swap(torch.autograd.Function):
    """fwd: exchange x with one peer of the group (a pairwise send / receive; same shape on both sides).
    bwd: the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x, group, peer: int):
        ctx.args = (group, peer)
        return _swap(x, group, peer)

    @staticmethod
    def backward(ctx, g):
        group, peer = ctx.args
        return _swap(g, group, peer), None, None


def _swap(x: torch.Tensor, group, peer: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    peer = dist.get_global_rank(group, peer)
    for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer, group),
                                       dist.P2POp(dist.irecv, out, peer, group)]):
        req.wait()
    return out


def _attend_block(attn: nn.Module, q, k, v, doc_ids, start: int) -> torch.Tensor:
    """Queries at global positions [start, start + n) against the keys [0, start + n) of the gathered k, v,
    as many heads as q (keys after the last query are masked for all of them: not computed). Causal: a
    lower-right causal bias, which the CUDA memory-efficient kernel applies without materialising a mask;
    document masking: an explicit (n, start + n) mask per row (ParallelDims caps the length for that case)."""
    n = q.shape[2]
    end = start + n
    k, v = k[:, :, :end], v[:, :, :end]
    if attn.cfg.document_masking and doc_ids is not None:
        pos = torch.arange(end, device=q.device)
        mask = pos[None, :] <= pos[start:, None]  # (n, end): key s <= query t
        mask = (mask & (doc_ids[:, start:end, None] == doc_ids[:, None, :end]))[:, None]  # (B, 1, n, end)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, end)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _allgather_kv_attend(attn: nn.Module, q, k, v, doc_ids, cp: _Cp) -> torch.Tensor:
    """Attention where Ulysses cannot split the heads: K and V of the whole sequence are all-gathered, and each
    rank attends queries to them. Exact for any head count.

    Causal load balance: with contiguous chunks, rank c's queries see (c + 1/2) L / cp keys on average, so the
    last rank would do 2 cp - 1 times the work of the first. Ranks c and p = cp - 1 - c pair up instead: each
    keeps the first half of its queries and computes the second half of its partner's (sent over, the outputs
    sent back), so every rank attends to about cp L / 2 keys per query pair (rank c: (c + 1/4) + (p + 3/4) = cp
    chunk lengths over its two half-blocks). With odd cp the middle rank is its own partner."""
    from jamba.attention import apply_rope, rope_cos_sin

    Ls, hd = q.shape[2], q.shape[3]
    L, off = Ls * cp.n, Ls * cp.rank
    if attn.cfg.use_rope:  # global positions: this rank's queries and keys sit at [off, off + Ls)
        cos, sin = rope_cos_sin(L, hd, attn.cfg.rope_theta, q.device)
        cos, sin = cos[off:off + Ls], sin[off:off + Ls]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = (_GatherSeq.apply(t, 2, cp.group, cp.n, cp.rank) for t in (k, v))  # (B, nkv, L, hd)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: the masked kernels want equal head counts; once, for both query blocks
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    peer, h = cp.n - 1 - cp.rank, Ls // 2
    if peer == cp.rank or h == 0:  # the middle rank of an odd cp (or 1-token chunks): its own block
        return _attend_block(attn, q, k, v, doc_ids, off)
    mine = _attend_block(attn, q[:, :, :h], k, v, doc_ids, off)  # my first half: [off, off + h)
    theirs = _Swap.apply(q[:, :, h:], cp.group, peer)  # the peer's second half: [peer Ls + h, (peer + 1) Ls)
    y_theirs = _attend_block(attn, theirs, k, v, doc_ids, peer * Ls + h)
    return torch.cat([mine, _Swap.apply(y_theirs, cp.group, peer)], dim=2)  # my second half, done by the peer


# ---- inputs and loss -----------------------------------------------------------------------------
def shard_inputs(model: nn.Module, cp: _Cp) -> None:
    """The model takes whole rows (B, L) and keeps this rank's tokens: input_ids and the aligned targets are
    sliced on the sequence; doc_ids stay whole (attention needs the row's documents).

    Aligned targets are `targets` where the model's forward has that argument (`labels` then follows
    transformers' convention, shifted inside the model: it is shifted here, on the whole row, into targets,
    so that a shard's last position keeps the next shard's first token as its target), else `labels`."""
    sig = inspect.signature(type(model).forward)
    aligned = "targets" if "targets" in sig.parameters else "labels"

    def pre_hook(mod, args, kwargs):
        bound = sig.bind(mod, *args, **kwargs)
        a = bound.arguments
        L = a["input_ids"].shape[1]
        if L % cp.n:
            raise ValueError(f"context parallelism: sequence length {L} is not divisible by parallel.cp={cp.n}; "
                             f"use a sequence length that is a multiple of {cp.n} (or change parallel.cp)")
        if aligned == "targets" and a.get("labels") is not None:  # HF labels -> aligned targets, whole row
            if a.get("targets") is not None:
                raise ValueError("give labels (shifted inside the model) or targets (aligned), not both")
            labels = a.pop("labels")
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
            a["targets"] = targets
        for name in ("input_ids", aligned):
            if a.get(name) is not None:
                if a[name].shape[1] != L:
                    raise ValueError(f"context parallelism: {name} has {a[name].shape[1]} positions, input_ids {L}")
                a[name] = cp.chunk(a[name], 1)
        if a.get("doc_ids") is not None and a["doc_ids"].shape[1] != L:
            raise ValueError(f"context parallelism: doc_ids must cover the whole row ({L}), got "
                             f"{a['doc_ids'].shape[1]}")
        args = bound.args[1:]
        return args, dict(bound.kwargs)

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def cp_loss(inner, cp: _Cp):
    """Wrap a mean-CE loss_fn: the local mean times (local valid tokens) * cp / (the cp group's valid
    tokens), so the mean over the cp ranks equals the mean CE over the whole rows, even when the ranks
    hold different numbers of ignored labels."""

    def loss_fn(hidden, weight, labels, ignore_index: int = -100, **kwargs):
        # the inner loss is read at call time: parallel.compile swaps in its compiled chunk function there
        local = loss_fn.cp_inner(hidden, weight, labels, ignore_index=ignore_index, **kwargs)
        n_local = (labels != ignore_index).sum()
        n = n_local.clone()
        dist.all_reduce(n, group=cp.group)
        scale = (n_local * cp.n).to(local.dtype) / n.clamp_min(1).to(local.dtype)
        return torch.where(n_local > 0, local * scale, torch.zeros_like(local))

    loss_fn.cp_inner = inner
    return loss_fn


def apply_cp(model: nn.Module, dims: ParallelDims) -> None:
    """Context-parallelise `model` in place over the "cp" mesh (after TP, before EP and FSDP)."""
    cp = _Cp(dims)
    kinds: List[str] = []
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):
            apply_cp_attention(layer.self_attn, cp)
            kinds.append("attention")
        elif hasattr(layer, "mamba"):
            if hasattr(layer.mamba, "_x_proj"):
                apply_cp_mamba1(layer.mamba, cp)
                kinds.append("mamba")
            elif hasattr(layer.mamba, "_conv_ssd"):
                apply_cp_mamba2(layer.mamba, cp)
                kinds.append("mamba2")
            else:
                raise NotImplementedError(f"context parallelism: layer {layer.layer_idx}'s mixer "
                                          f"{type(layer.mamba).__name__} has no seam to split (set parallel.cp=1)")
    shard_inputs(model, cp)
    model.loss_fn = cp_loss(model.loss_fn, cp)
    logger.info("context parallelism cp=%d over %d layers (%s)", cp.n, len(kinds),
                ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds))))


def traffic_per_step(cfg, seq_len: int, batch: int, cp: int, tp: int = 1, itemsize: int = 2) -> dict:
    """Bytes one rank sends through context parallelism's collectives in one training step (forward,
    backward, and the forward again for layers under activation checkpointing), for `batch` rows of
    `seq_len` tokens and activations of `itemsize` bytes (2 under bf16 autocast). Mamba-1 layers: x and z
    (2 Di/tp channels) and y (Di/tp) by all-to-all, [dt, B, C] (R + 2N per token, the whole sequence) by
    all-reduce; Mamba-2 layers: x with dt (Di + H channels) and y (Di) by all-to-all, B and C (2 G N per
    token) in the same all-to-all where cp divides G, else by all-gather in every forward and an all-reduce
    of their gradient in backward; attention
    (Ulysses): q, k, v and the output by all-to-all (None where it would all-gather K/V instead). Measured
    against TRAFFIC in tests/launch/test_bench_cp.py."""
    from jamba.model import _checkpointed

    Ls, a2a, ar, ag = seq_len // cp, 0.0, 0.0, 0.0
    part = (cp - 1) / cp
    for spec in cfg.layer_specs():
        passes = 3 if _checkpointed(cfg, spec) else 2  # forward, backward (+ the recomputed forward)
        if spec.mixer == "attention":
            nq, nkv = cfg.num_attention_heads // tp, max(cfg.num_key_value_heads // tp, 1)
            mode = ulysses_heads(nq, nkv, cp)
            if mode is None:
                return {"all_to_all": None, "all_reduce": None, "all_gather": None}
            nkv = nkv if mode == "shard" else cp
            a2a += passes * batch * Ls * cfg.attn_head_dim * (2 * nq + 2 * nkv) * part
        elif cfg.mamba_mixer == "mamba2":
            heads, bc = cfg.mamba2_nheads, 2 * cfg.mamba2_n_groups * cfg.mamba_d_state
            if cfg.mamba2_n_groups % cp == 0:  # B and C by groups, inside the all-to-all
                a2a += passes * batch * Ls * (2 * cfg.d_inner + heads + bc) * part
            else:
                a2a += passes * batch * Ls * (2 * cfg.d_inner + heads) * part
                ag += (passes - 1) * batch * seq_len * bc * part  # every forward (recomputation included)
                ar += batch * seq_len * bc * 2 * part  # their gradient, once in backward
        else:
            di = cfg.d_inner // tp
            a2a += passes * batch * Ls * 3 * di * part
            ar += passes * batch * seq_len * (cfg.dt_rank + 2 * cfg.mamba_d_state) * 2 * part
    return {"all_to_all": int(a2a * itemsize), "all_reduce": int(ar * itemsize), "all_gather": int(ag * itemsize)}
