"""Peak memory per GPU of one training step, from the config alone (no model is built).

The step is walked the way autograd runs it: at the end of the forward every layer's saved activations
are alive (or only its input, where the layer is activation-checkpointed) together with the loss's saved
gradients; then the backward visits the layers in reverse, FFN before mixer, each one (re)materialising
its saved tensors if checkpointed, adding its gradient temporaries, then freeing them and allocating its
parameter gradients. The peak is the largest live total on the way (`MemoryPlan.where` says where).

Saved tensors per token of one layer (bf16 activations, a = 2 bytes; Di = d_inner / tp, I = intermediate /
tp, hq / hkv = query / key-value widths per tp rank, R = dt rank, N = d_state, k = top-k, E = experts):

| block | saved for backward (bytes per token) | gradient temporaries (bytes per token) |
|---|---|---|
| residual stream | 2 H r (the layer's input and the mixer's output, read by the two RMSNorms; r = 2, or 4 under autocast over fp32 weights; H / tp with sequence parallelism) | |
| Mamba-1 | H a (in_proj input) + 6 Di a (x, z, conv output, delta, scan y, scan output) + 2 (R + 2N) a (x_proj output, normed dt/B/C) + 2N a cp (B, C of the whole sequence) + 64 Di / interval (fp32 scan states, interval 16 or 256: `plan_layout.scan_state_interval`) | H a + 4 Di a (+ 2 Di a all-to-all buffers under cp) |
| attention (SDPA flash, O(L)) | H a + (3 hq + 2 hkv) a + 4 heads (q, k, v, output and its o_proj copy, log-sum-exp) | H a + (2 hq + 2 hkv) a |
| MLP | H a + 2 I a (gate and up; compiled code recomputes silu(g) * u, eager keeps both: 4 I a) | H a + 3 I a |
| MoE | H a + 2 k H a (routed copies, their outputs) + 2 k I a (4 eager, and under ep or tp, which run the experts outside torch.compile; k x ep rows with the padded EP exchange) + E (a + 4) + 28 k (routing) | H a + 3 k I a + 2 k H a |
| MoE, token chunks of c | H a (the chunks' inputs) | one chunk: c x (saved + temporaries of MoE) |
| loss (fused chunked CE) | H a (its input gradient, computed in forward) + V H 4 / tp (fp32 lm_head gradient) | chunk x V / tp x 10 (fp32 logits, bf16 gradient) |

An activation-checkpointed layer keeps only its input (H r per token) and re-creates the table's saved
tensors during its own backward. Under cp each rank holds seq / cp tokens of the residual stream;
inside the Mamba scan it holds the whole sequence for Di / cp channels (the same bytes), attention holds
the whole sequence for heads / cp (Ulysses; all keys and values where cp does not divide the heads).

Model states per rank (P = parameters on this rank after tp / ep): weights "bf16" (launch.bench): 2 P params +
4 P AdamW states, 2 P gradients allocated during the backward. "fp32-master" (train.py): 4 P + 8 P, 4 P
gradients; one rank: bf16 autocast copies of the weights (2 P) saved by the layers that use them;
several ranks (FSDP2 over dp_shard x cp, experts over dp_shard x cp / ep): the states are sharded, plus
bf16 unsharded parameters of the root (embedding, lm_head), of two layers (the current and the prefetched
one) and, in a layer's backward, its unsharded bf16 gradients and their fp32 copy for the reduce-scatter.
With gradient accumulation the gradients stay allocated between micro-batches (unsharded in fp32 under FSDP2,
which skips the reduce-scatter until the last micro-batch).

Calibration (fitted once to the measured points in launch/plan_points.jsonl; `python -m launch.plan
--calibrate` refits and prints each point's error): SAVED_SCALE multiplies the saved activations (what the
table misses: allocator block rounding, small tensors, compiler-kept intermediates), TEMP_SCALE the gradient
temporaries, and FIXED_GIB is added once (cuBLAS / Inductor workspaces, the allocator's granularity). RESERVE_GIB is memory
outside PyTorch's allocator (CUDA context, NCCL buffers) that a stage must leave free: an assumption,
checked by the measured OOM at 458,752 tokens (launch/plan_points.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from launch.plan_layout import GIB, Setup, layer_param_counts, scan_state_interval

# Fitted by `python -m launch.plan --calibrate` to launch/plan_points.jsonl (6 measured peaks on one H100; each
# within 1.2% after the fit, 7.5-8% before it). TEMP_SCALE came out 0: on those points the backward's gradient
# temporaries never raised the peak above what the saved tensors they replace had taken (autograd frees a
# node's saved tensors as it runs, Inductor frees buffers after their last use). It stays a constant, not a
# deleted term, so points where temporaries do matter (cp's all-to-all buffers) can show it when refitted.
SAVED_SCALE = 1.1063
TEMP_SCALE = 0.0
FIXED_GIB = 2.031
RESERVE_GIB = 1.0  # one GPU: CUDA context and cuBLAS handles outside max_memory_allocated
RESERVE_MULTI_GIB = 2.5  # several GPUs: plus NCCL's buffers and communicators

A = 2  # bytes of a bf16 activation


@dataclass
class MemoryPlan:
    peak_gib: float
    where: str
    parts: Dict[str, float] = field(default_factory=dict)  # GiB at the peak, by kind

    def fits(self, setup: Setup, margin: float = 0.0) -> bool:
        """Whether the peak fits the GPU, keeping a `margin` fraction of the usable memory free."""
        return self.peak_gib <= usable_gib(setup) * (1 - margin)


def usable_gib(setup: Setup) -> float:
    """The GPU's memory less what lives outside PyTorch's allocator (RESERVE_GIB / RESERVE_MULTI_GIB)."""
    return setup.gpu.mem_gib - (RESERVE_MULTI_GIB if setup.world > 1 else RESERVE_GIB)


@dataclass
class ActivationDims:
    H: int
    hs: float  # residual stream width per rank (H / tp with sequence parallelism)
    r: int  # residual stream bytes per element
    di: float
    i: float
    hq: float
    hkv: float  # key/value width per rank as attention holds it (after cp's all-to-all or gather)
    heads: float
    R: int
    N: int
    E: int
    k: int
    cp: int
    interval: int
    compiled: bool
    pad: int = 1  # parallel.ep_exchange=padded: each rank's experts hold ep x its routed rows (static blocks)
    # under ep or tp the experts run outside torch.compile (parallel/expert_parallel.py), so they keep what eager
    # autograd keeps whether or not the layers are compiled
    experts_compiled: bool = True


def activation_dims(s: Setup) -> ActivationDims:
    m, tp, cp = s.model, s.tp, s.cp
    hd = m.attn_head_dim
    kv_tp = max(m.num_key_value_heads // tp, 1) * hd  # kv heads are replicated when tp exceeds them
    hkv = (cp * max(m.num_key_value_heads // tp // cp, 1) * hd) if s.ulysses else cp * kv_tp
    if cp == 1:
        hkv = kv_tp
    autocast_fp32 = s.weights == "fp32-master" and not s.fsdp  # fp32 embedding output, fp32 residual stream
    return ActivationDims(H=m.hidden_size, hs=m.hidden_size / tp if s.sequence_parallel else m.hidden_size,
                 r=4 if autocast_fp32 else 2, di=m.d_inner / tp, i=m.intermediate_size / tp,
                 hq=m.num_attention_heads * hd / tp, hkv=hkv, heads=m.num_attention_heads / tp,
                 R=m.dt_rank, N=m.mamba_d_state, E=m.num_experts, k=m.num_experts_per_tok, cp=cp,
                 interval=scan_state_interval(s.micro_batch, m.d_inner // (tp * cp), s.seq_len),
                 compiled=s.compiled, pad=s.ep if s.ep_padded else 1,
                 experts_compiled=s.compiled and s.ep == 1 and s.tp == 1)


def mixer_bytes(d: ActivationDims, kind: str) -> Tuple[float, float]:
    """(saved, gradient temporaries) bytes per rank token of a mixer."""
    if kind == "mamba":
        saved = d.H * A + 6 * d.di * A + 2 * (d.R + 2 * d.N) * A + 2 * d.N * A * d.cp + 64 * d.di / d.interval
        temp = d.H * A + 4 * d.di * A + (2 * d.di * A if d.cp > 1 else 0)
        return saved, temp
    saved = d.H * A + (3 * d.hq + 2 * d.hkv) * A + 4 * d.heads
    temp = d.H * A + (2 * d.hq + 2 * d.hkv) * A
    return saved, temp


def ffn_bytes(d: ActivationDims, kind: str) -> Tuple[float, float]:
    """(saved, gradient temporaries) bytes per rank token of an FFN, without token chunking."""
    keep = 2 if d.compiled else 4
    if kind == "mlp":
        return d.H * A + keep * d.i * A, d.H * A + 3 * d.i * A
    kx = d.k * d.pad  # expert rows per token: the routed copies, or with padded EP blocks ep x as many
    keep_experts = 2 if d.experts_compiled else 4
    saved = d.H * A + 2 * kx * d.H * A + keep_experts * kx * d.i * A + d.E * (A + 4) + 28 * d.k
    temp = d.H * A + 3 * kx * d.i * A + 2 * kx * d.H * A
    return saved, temp


@dataclass
class _States:
    base: float  # bytes alive for the whole step (parameters, optimizer states, root buffers)
    layer_grads: List[float]  # bytes of gradients each layer's backward leaves allocated
    layer_transient: List[float]  # bytes alive only during that layer's backward (unsharded grads, etc.)
    layer_saved_weights: List[float]  # bf16 weight copies a layer saves for backward (autocast, one rank)
    top_grads: float
    # the copies outlive the forward whether or not the layer is checkpointed (FSDP2 without reshard after
    # forward); autocast's copies of a checkpointed layer are dropped at the end of forward and re-made
    weights_kept: bool = False


def _model_states(s: Setup) -> _States:
    top, layers = layer_param_counts(s.model)
    tp, ep = s.tp, s.ep
    dense = [d / tp for d, _ in layers]
    experts = [e / (tp * ep) for _, e in layers]
    top_p = (top["embedding"] + top["lm_head"]) / tp + top["final_norm"]
    local = [d + e for d, e in zip(dense, experts)]
    n_local = sum(local) + top_p
    if s.weights == "bf16":
        pb, gb, ob = 2, 2, 4  # launch.bench: bf16 parameters, gradients and AdamW states
    else:
        pb, gb, ob = 4, 4, 8
    if s.first_step:
        ob = 0  # AdamW creates its states in its first step(), after this backward
    if not s.fsdp:
        base = n_local * (pb + ob)
        if s.grad_accum > 1:
            base += n_local * gb
            grads = [0.0] * len(layers)
            top_grads = 0.0
        else:
            grads = [p * gb for p in local]
            top_grads = top_p * gb
        saved_w = [2 * p for p in local] if s.weights == "fp32-master" else [0.0] * len(layers)
        return _States(base, grads, [0.0] * len(layers), saved_w, top_grads)
    # FSDP2: dense parameters sharded over dp_shard x cp, experts over dp_shard x cp / ep
    fd, fe = s.fsdp_dense, s.fsdp_experts
    sharded = sum(d / fd + e / fe for d, e in zip(dense, experts)) + top_p / fd
    base = sharded * (pb + ob)
    base += 2 * top_p  # the root's unsharded bf16 parameters (not resharded after forward)
    base += 2 * 2 * max(local)  # unsharded bf16 parameters of the current and the prefetched layer
    if s.grad_accum > 1:
        base += 4 * n_local  # FSDP2 accumulates unsharded gradients until the last micro-batch
        grads = [0.0] * len(layers)
        top_grads = 0.0
    else:
        grads = [gb * (d / fd + e / fe) for d, e in zip(dense, experts)]
        top_grads = gb * top_p / fd
    # unsharded bf16 gradients + their reduce-scatter input (fp32, or bf16 with parallel.reduce_dtype=bfloat16)
    transient = [(2 + s.reduce_bytes) * p for p in local]
    # parallel.reshard_after_forward=false: a layer's gathered bf16 weights live from its forward to its backward,
    # like the weight copies autocast saves with one rank (and are freed the same way after its backward)
    kept = [0.0] * len(layers) if s.reshard_after_forward else [2 * p for p in local]
    return _States(base, grads, transient, kept, top_grads, weights_kept=not s.reshard_after_forward)


def plan_memory(s: Setup, saved_scale: float = None, temp_scale: float = None, fixed_gib: float = None
                ) -> MemoryPlan:
    """Peak allocated memory of one rank in one training step (see the module docstring)."""
    saved_scale = SAVED_SCALE if saved_scale is None else saved_scale
    temp_scale = TEMP_SCALE if temp_scale is None else temp_scale
    fixed = (FIXED_GIB if fixed_gib is None else fixed_gib) * GIB
    m, d = s.model, activation_dims(s)
    T = s.tokens_per_rank
    st = _model_states(s)
    specs = m.layer_specs()
    chunk = m.moe_token_chunk if m.moe_token_chunk and T > m.moe_token_chunk else None

    # per layer: (residual, mixer saved, mixer temp, ffn saved, ffn temp) in bytes
    blocks = []
    for spec in specs:
        ms, mt = mixer_bytes(d, spec.mixer)
        fs, ft = ffn_bytes(d, spec.ffn)
        chunk_saved = 0.0
        if spec.ffn == "moe" and chunk:  # one chunk re-created and differentiated at a time
            chunk_saved, ft, fs = chunk * fs, chunk * ft / T, d.H * A
        blocks.append((T * 2 * d.hs * d.r, T * ms, T * mt, T * fs, T * ft, chunk_saved))
    ckpt = [s.checkpointed(sp.mixer, sp.ffn) for sp in specs]

    def act(x: float) -> float:
        return saved_scale * x

    def tmp(x: float) -> float:
        return temp_scale * x

    doc_mask = 0.0
    if m.document_masking and any(sp.mixer == "attention" for sp in specs):
        doc_mask = s.micro_batch * s.seq_len * s.seq_len / s.cp  # the dense (B, 1, L, L) bool mask
    stored = [T * d.hs * d.r if c else b[0] + b[1] + b[3] for b, c in zip(blocks, ckpt)]
    v_local = m.vocab_size / s.tp
    loss_saved = T * (d.H * A + d.hs * d.r)  # the loss's input gradient and the final norm's input
    loss_gw = v_local * d.H * 4  # fp32 lm_head gradient accumulated by the fused loss in forward
    loss_ws = min(m.loss_chunk_size, T) * v_local * 10

    # weight copies kept for backward (autocast: of the layers not checkpointed)
    w_live = sum(w for w, c in zip(st.layer_saved_weights, ckpt) if not c or st.weights_kept)
    acts = act(sum(stored) + loss_saved) + doc_mask
    grads = 0.0

    def snapshot(total: float, activations: float, transient: float = 0.0, weights: float = None):
        weights = w_live if weights is None else weights
        return total, {"model states": st.base / GIB, "gradients": grads / GIB, "weight copies": weights / GIB,
                       "activations": activations / GIB, "fsdp buffers": transient / GIB,
                       "loss lm_head grad": (total - st.base - grads - weights - activations - transient) / GIB}

    # end of forward: the loss's chunk workspace, its fp32 lm_head gradient, and (autocast) the weight copies
    # of the checkpointed layers, still in autocast's cache
    cache = 0.0 if st.weights_kept else sum(w for w, c in zip(st.layer_saved_weights, ckpt) if c)
    peak, parts = snapshot(st.base + w_live + cache + acts + tmp(loss_ws) + loss_gw, acts + tmp(loss_ws),
                           weights=w_live + cache)
    where = "loss (end of forward)"

    # the loss's backward: its saved input gradient becomes the incoming gradient of the stream
    acts += act(T * d.H * A - loss_saved)
    grads += st.top_grads
    for li in reversed(range(len(specs))):
        res, ms, mt, fs, ft, chunk_saved = blocks[li]
        w = st.layer_saved_weights[li]
        if ckpt[li]:  # re-created: its saved tensors (and, with autocast, its weight copies)
            acts += act(res / 2 + ms + fs)
            w_live += 0.0 if st.weights_kept else w
        for name, work, free in ((specs[li].ffn, act(chunk_saved) + tmp(ft), fs + res / 2),
                                 (specs[li].mixer, tmp(mt), ms + res / 2)):
            total = st.base + grads + w_live + acts + work + st.layer_transient[li]
            if total > peak:
                peak, parts = snapshot(total, acts + work, st.layer_transient[li])
                where = f"backward of layer {li} ({name})"
            acts -= act(free)
        w_live -= w
        grads += st.layer_grads[li]
    parts["fixed"] = fixed / GIB
    return MemoryPlan((peak + fixed) / GIB, where, parts)
