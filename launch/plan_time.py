"""Step time and tokens/s of one training step, from the config alone.

Per rank and micro-batch (T = micro_batch x seq / cp tokens of the residual stream), the step is a sum of
kernel families, each priced from a measurement on one H100 (bench-3b, 16384 x 1, compiled: the README's
`--profile` breakdown and `launch.bench_scan`), then scaled to the setup:

| family | time | from |
|---|---|---|
| GEMMs | 6 x matmul parameters x T / tp (+2x for recomputed layers, +2x per extra MoE forward) / ceiling | profile: GEMMs ran at the measured matmul ceiling |
| attention | flops.py's attention term x 3 (+1 when recomputed) / (ATTN_EFF x ceiling) | profile: 14 ms for 6.6 TFLOP -> 0.63 of the ceiling |
| selective scan | channels x tokens x (6.74e-11 s at a state per 16 steps, 8.42e-11 s per 256; +2.19e-11 s per recomputed forward) | bench_scan, 1 x 4096 x 16384 x 16: 4.52 / 5.65 ms fwd+bwd, 1.47 ms fwd |
| element-wise, norms, routing, conv | ELEMENTWISE_TRAFFIC x the layers' saved activation bytes per token, read at HBM speed (+1/3 when recomputed) | profile: 29 ms at 16K x 1 = 3.1 x bench-3b's 1.9 MB/token of saved activations at 3.35 TB/s |
| AdamW | bytes per parameter (bf16: 14; fp32: 28, + 12 for train.py's gradient clipping) / (OPT_BW x HBM), once per optimizer step | profile: 19 ms for 3.0B bf16 parameters = 2.2 TB/s = 0.66 of HBM |
| autocast weight casts | 6 bytes per parameter per forward (train.py on one rank: fp32 weights cast to bf16) | HBM speed |
| FSDP's copies | HBM bytes of FSDP2's all-gather copy-in / copy-out and reduce-scatter copy-in / cast (`_fsdp_copy_bytes`) at AdamW's HBM efficiency | 2 H200s, compiled: FSDP's compute equals one GPU's, whose AdamW and weight casts FSDP halves or drops (README) |
| communication | bytes / link bandwidth, not overlapped (cp all-to-alls, TP all-reduces, EP all-to-alls); FSDP's all-gathers and reduce-scatters overlap the layers' compute, only what exceeds it counts, plus the step's first all-gathers and last reduce-scatter, which nothing hides | assumption; EP's all-to-alls measured 2.8x this price (`plan_points.jsonl`) |

Communication volumes per rank and layer (a = 2 bytes, "x2" = forward and backward, "+1" per recomputed forward):
- cp, Mamba-1 (sequence <-> channel all-to-all around conv + scan): 4 tensors of d_inner / tp per token
  (three in: conv input, z, dt; the scan output back), each moving (cp - 1) / cp of its bytes.
- cp, attention (Ulysses): q, k, v in and the output back; keys and values gathered where cp does not divide
  the heads.
- tp: 2 all-reduces of the residual stream per layer (2 (tp - 1) / tp of its bytes each; sequence parallel
  moves the same bytes as a reduce-scatter + all-gather).
- ep: the k routed copies of each token out and back.
- FSDP (fp32-master with several ranks): bf16 all-gather of the parameters twice (forward, backward), fp32
  reduce-scatter of the gradients, each (n - 1) / n of the layer's bytes.

One constant is fitted to the measured points (`python -m launch.plan --calibrate`): STEP_OVERHEAD, the
ratio of a step's wall time to the sum of its kernels (idle gaps, launch latency, the families above being
priced at 16K and not exactly scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from jamba.flops import flops_per_token
from launch.plan_layout import Setup, layer_param_counts
from launch.plan_memory import A, activation_dims, ffn_bytes, mixer_bytes

# Fitted by `python -m launch.plan --calibrate`: geometric mean over the 5 measured tokens/s points of
# launch/plan_points.jsonl (H100 and H200, launch.bench and train.py); after the fit they are within -3.2% to +4.5%.
STEP_OVERHEAD = 1.1043
ATTN_EFF = 0.63
SCAN_S = {16: 6.74e-11, 256: 8.42e-11}  # forward + backward, s per channel x token
SCAN_FWD_S = 2.19e-11
ELEMENTWISE_TRAFFIC = 3.1
OPT_BW = 0.66


@dataclass
class TimePlan:
    step_s: float  # one micro-batch's forward + backward, plus its share of the optimizer step
    tokens_per_s: float  # the whole job: dp x micro_batch x seq tokens per step_s
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs (flops.py, no recomputation) over world x ceiling
    parts: Dict[str, float] = field(default_factory=dict)  # seconds by family
    comm_share: float = 0.0


def _collective(nbytes: float, size: int, bandwidth: float, factor: float = 1.0) -> float:
    """Seconds for a collective moving `factor` x (size - 1) / size of `nbytes` per rank."""
    return 0.0 if size <= 1 else factor * nbytes * (size - 1) / size / bandwidth


def _fsdp_copy_bytes(s: Setup, local: float) -> float:
    """HBM bytes per micro-batch of FSDP2's own copies, for `local` parameters per rank before sharding over
    n = fsdp_dense ranks (fp32 shards, bf16 compute): each all-gather casts the fp32 shard into its bf16 input
    (6 / n bytes per parameter) and copies the gathered buffer out into the parameters (read + write 4); the
    reduce-scatter copies the bf16 gradients into its input in the reduce dtype (2 + r) and casts its output
    shard to the fp32 gradient (r + 4) / n. All-gathers: 1 with reshard_after_forward=false, else 2 (forward,
    backward); the reduce-scatter once per optimizer step. One rank's train.py has none of this but casts
    its fp32 weights under autocast instead ("weight casts"). Assumes fp32 sharded weights (train.py's)."""
    n, r = s.fsdp_dense, s.reduce_bytes
    gathers = 1 if not s.reshard_after_forward else 2
    return local * (gathers * (6 / n + 4) + ((2 + r) + (r + 4) / n) / s.grad_accum)


def _fsdp_link_bytes(s: Setup, local: float) -> tuple:
    """Bytes per rank per micro-batch that FSDP moves over links, for `local` parameters per rank before
    sharding: (over the fsdp_dense group: the bf16 all-gathers, one with reshard_after_forward=false, else two,
    plus the reduce-scatter in the reduce dtype once per optimizer step; over the dp_replicate group: HSDP's
    all-reduce of the shard in the same dtype, also once per optimizer step)."""
    gathers, r = (1 if not s.reshard_after_forward else 2), s.reduce_bytes
    return gathers * 2 * local + r * local / s.grad_accum, r * local / s.fsdp_dense / s.grad_accum


def _fsdp_exposed(s: Setup, top: Dict[str, float], first_layer, bandwidth: float) -> float:
    """The collectives no computation hides: the step's first all-gathers (the root's embedding and final
    norm, then the first layer's, before any compute) and its last reduce-scatter (the root's, after the
    last backward kernel). Assumes lm_head in its own unit (parallel.fsdp_lm_head_unit, the default), which
    overlaps; in the root unit its reduce-scatter would add to the last one (two of the checked points were
    measured so: under 0.2 ms here). The first layer's experts are counted as dense parameters (bench-3b's
    and jamba-v0.1's first layer has none)."""
    root = (top["embedding"] + top["final_norm"]) / s.tp
    first = sum(first_layer) / s.tp
    r = s.reduce_bytes
    gather = _collective(2 * (root + first), s.fsdp_dense, bandwidth)
    reduce = _collective(r * root, s.fsdp_dense, bandwidth) / s.grad_accum
    return gather + reduce


def plan_time(s: Setup, step_overhead: float = None) -> TimePlan:
    overhead = STEP_OVERHEAD if step_overhead is None else step_overhead
    m, g, d = s.model, s.gpu, activation_dims(s)
    T = s.tokens_per_rank
    ceiling = g.matmul_tflops * 1e12
    hbm = g.hbm_tbs * 1e12
    top, layers = layer_param_counts(m)
    specs = m.layer_specs()
    kE = m.num_experts_per_tok / m.num_experts
    chunked = bool(m.moe_token_chunk) and T > m.moe_token_chunk

    gemm = attn = scan = elem = 0.0
    cp_bytes = tp_bytes = ep_bytes = 0.0
    hd = m.attn_head_dim
    for spec, (dense, experts) in zip(specs, layers):
        ac = s.checkpointed(spec.mixer, spec.ffn)
        fwd = 2 if ac else 1  # forward passes of the layer
        moe_fwd = fwd + (1 if spec.ffn == "moe" and chunked else 0)
        mm = dense - 2 * m.hidden_size  # norms are not matmuls
        mm_exp = experts * kE
        if spec.mixer == "mamba":  # conv weights, A, D, biases are not matmul parameters
            mm -= m.d_inner * (m.mamba_d_conv + m.mamba_d_state + 3)
        gemm += 2 * T * (mm * (2 + fwd) + mm_exp * (2 + moe_fwd)) / s.tp
        ms, _ = mixer_bytes(d, spec.mixer)
        fs, _ = ffn_bytes(d, spec.ffn)
        elem += ELEMENTWISE_TRAFFIC * T * (ms + fs + 2 * d.hs * d.r) * (2 + fwd) / 3 / hbm
        if spec.mixer == "attention":
            per_token = 4 * m.num_attention_heads * hd * (s.seq_len + 1) / 2 / s.tp
            attn += per_token * T * (2 + fwd) / (ATTN_EFF * ceiling)
            q, kv = d.hq * T * A, (d.hkv / d.cp) * T * A
            cp_bytes += (2 * q + 2 * kv) * (1 + fwd)  # q, k, v in + output back; forward(s) and backward
        else:
            interval = d.interval
            scan += T * d.di * (SCAN_S[interval] + (fwd - 1) * SCAN_FWD_S)
            cp_bytes += 4 * d.di * T * A * (1 + fwd)
        tp_bytes += 2 * T * d.H * A * (1 + fwd)
        if spec.ffn == "moe":
            ep_bytes += 2 * m.num_experts_per_tok * T * d.H * A * (1 + moe_fwd) * d.pad
    # lm_head: forward + both gradients inside the fused loss
    gemm += 6 * T * m.vocab_size * m.hidden_size / s.tp
    gemm /= ceiling

    local = (sum(dn for dn, _ in layers) + top["embedding"] + top["lm_head"]) / s.tp \
        + sum(e for _, e in layers) / (s.tp * s.ep)
    if s.fsdp:
        shard = local / s.fsdp_dense  # close enough for experts too (sharded over dp_shard x cp / ep)
    else:
        shard = local
    if s.weights == "bf16":
        opt_bytes = 14 * shard
    else:
        opt_bytes = (28 + 12) * shard
    opt = opt_bytes / (OPT_BW * hbm) / s.grad_accum
    # train.py on one rank: autocast casts the fp32 weights to bf16 in every forward, recomputation included
    forwards = 1 + sum(s.checkpointed(sp.mixer, sp.ffn) for sp in specs) / len(specs)
    casts = 6 * local * forwards / hbm if (s.weights == "fp32-master" and not s.fsdp) else 0.0

    bw = s.group_bandwidth
    comm = {
        "cp all-to-all": _collective(cp_bytes, s.cp, bw(s.cp, s.tp)),
        "tp all-reduce": _collective(tp_bytes, s.tp, bw(s.tp, 1), factor=2.0),
        "ep all-to-all": _collective(ep_bytes, s.ep, bw(s.ep, s.tp)),
    }
    fsdp_copies = _fsdp_copy_bytes(s, local) / (OPT_BW * hbm) if s.fsdp else 0.0
    compute = gemm + attn + scan + elem + opt + casts + fsdp_copies
    if s.fsdp:
        shard_bytes, replicate_bytes = _fsdp_link_bytes(s, local)
        fsdp = _collective(shard_bytes, s.fsdp_dense, bw(s.fsdp_dense, s.cp * s.tp))
        if s.dp_replicate > 1:
            fsdp += _collective(replicate_bytes, s.dp_replicate,
                                bw(s.dp_replicate, s.dp_shard * s.cp * s.tp), factor=2.0)
        comm["fsdp (beyond overlap)"] = max(0.0, fsdp - compute)
        comm["fsdp first gather, last reduce"] = _fsdp_exposed(s, top, layers[0], bw(s.fsdp_dense, s.cp * s.tp))
    parts = {"gemm": gemm, "attention": attn, "scan": scan, "elementwise": elem, "optimizer": opt,
             "weight casts": casts, "fsdp copies": fsdp_copies, **comm}
    step = overhead * (compute + sum(comm.values()))
    tokens = s.dp * s.micro_batch * s.seq_len
    tps = tokens / step
    model_flops = flops_per_token(m, s.seq_len) * tps
    return TimePlan(step, tps, tps / s.world, model_flops / (s.world * ceiling),
                    {k: overhead * v for k, v in parts.items()}, sum(comm.values()) / (compute + sum(comm.values())))
