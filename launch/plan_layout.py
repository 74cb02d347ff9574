"""What the planner plans for: a model, a parallel layout, a batch shape, a training mode and a GPU.

`Setup` is plain data (no torch, no process group); `launch.plan_memory` and `launch.plan_time` read it.
Per-rank sizes follow the mesh of parallel/dims.py: dp_replicate x dp_shard x cp x tp = world; ep is carved
out of dp_shard x cp; tp is the innermost (fastest-varying) rank dimension, then cp, so a tp or cp group
of g ranks spans g * (inner degrees) consecutive ranks, which stay on one node while that is <= gpus_per_node.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Tuple

from jamba.config import ConfigError, JambaConfig
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims, ulysses_heads

GIB = 2 ** 30
WEIGHT_MODES = ("bf16", "fp32-master")


@dataclass(frozen=True)
class GPU:
    """One accelerator. `mem_gib`: what torch.cuda.get_device_properties(0).total_memory reports, in GiB.
    `matmul_tflops`: a *measured* bf16 8192^3 matmul rate (launch.bench measures it in every run).
    `hbm_tbs`: HBM bandwidth (spec sheet, TB/s). `link_gbs` / `inter_node_gbs`: bus bandwidth per GPU an
    all-to-all / all-reduce reaches inside a node (NVLink) and across nodes (InfiniBand), GB/s."""

    name: str
    mem_gib: float
    matmul_tflops: float
    hbm_tbs: float
    link_gbs: float = 350.0
    inter_node_gbs: float = 45.0
    gpus_per_node: int = 8


# H100: 735 TFLOP/s is the mean of the two ceilings measured with the README's table (743.7, 727.4; the
# H100s we were lent ranged 687-769). H200 is the same GH100 chip with more and faster HBM: same matmul
# ceiling assumed (not measured). Link figures are assumptions: NVLink4 (450 GB/s per direction) at ~78%
# bus efficiency; 400 Gb/s InfiniBand per GPU at ~90%.
GPUS: Dict[str, GPU] = {
    "h100": GPU("H100 80GB", mem_gib=79.2, matmul_tflops=735.0, hbm_tbs=3.35),
    "h200": GPU("H200 141GB", mem_gib=139.8, matmul_tflops=735.0, hbm_tbs=4.8),
}


@dataclass(frozen=True)
class Setup:
    """A training configuration as one rank sees it.

    weights: "bf16" = parameters, gradients and AdamW states all bf16, no fp32 master (what
    `python -m launch.bench` does: `model.to(bf16)` + fused AdamW); "fp32-master" = what train.py does on a
    GPU: fp32 parameters, gradients and AdamW states, bf16 compute (FSDP2 mixed precision with more than one
    rank; bf16 autocast over fp32 weights with one rank, where no FSDP is applied).
    """

    model: JambaConfig
    seq_len: int
    micro_batch: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    reshard_after_forward: bool = True
    """FSDP2 frees each decoder layer's gathered weights after its forward (parallel.reshard_after_forward
    null/true); false keeps them until the layer's backward."""
    reduce_bf16: bool = False
    """Gradients reduce-scattered in bf16 (parallel.reduce_dtype=bfloat16) instead of fp32."""
    ep_padded: bool = False
    """parallel.ep_exchange=padded: fixed blocks of a rank's routed rows to every EP peer (ep x the bytes, and
    ep x the rows in each rank's experts)."""
    weights: str = "fp32-master"
    compiled: bool = True
    grad_accum: int = 1
    first_step: bool = False
    """The first optimizer step of a run: AdamW allocates its states in its first step(), after the backward, so
    the backward's peak lacks them (what `launch.bench --find-max-seq` measures: each length's first step)."""
    gpu: GPU = field(default_factory=lambda: GPUS["h100"])

    def __post_init__(self) -> None:
        m = self.model
        if m.mamba_mixer != "mamba1" and any(s.mixer == "mamba" for s in m.layer_specs()):
            raise ConfigError(f"model.mamba_mixer={m.mamba_mixer!r}: the planner models Mamba-1 layers only "
                              "(Jamba's); plan with model.mamba_mixer=mamba1")
        if self.weights not in WEIGHT_MODES:
            raise ConfigError(f"weights={self.weights!r} must be one of {list(WEIGHT_MODES)}")
        for name in ("seq_len", "micro_batch", "dp_replicate", "dp_shard", "tp", "ep", "cp", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        # The same checks as train.py's (parallel/dims.py): a layout the planner accepts is one train.py runs.
        par = ParallelConfig(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp, ep=self.ep,
                             cp=self.cp, sequence_parallel=self.sequence_parallel)
        ParallelDims(par, world_size=self.world, model=m, seq_len=self.seq_len)

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each reads its own micro-batches; cp and tp ranks share one)."""
        return self.dp_replicate * self.dp_shard

    @property
    def reduce_bytes(self) -> int:
        """Bytes per gradient element in FSDP's reduce-scatter (reduce_bf16: 2, else fp32: 4)."""
        return 2 if self.reduce_bf16 else 4

    @property
    def tokens_per_rank(self) -> int:
        """Tokens of the residual stream on one rank: micro_batch x seq_len / cp."""
        return self.micro_batch * self.seq_len // self.cp

    @property
    def fsdp_dense(self) -> int:
        """Ranks that shard dense parameters (FSDP2 over dp_shard x cp)."""
        return self.dp_shard * self.cp

    @property
    def fsdp_experts(self) -> int:
        return self.dp_shard * self.cp // self.ep

    @property
    def fsdp(self) -> bool:
        """train.py applies FSDP2 whenever there is more than one rank (launch.bench runs one GPU, none)."""
        return self.weights == "fp32-master" and self.world > 1

    @property
    def ulysses(self) -> bool:
        """Attention under cp: Ulysses' head all-to-all where context parallelism uses it (cp divides the query
        heads per tp rank, and the kv heads divide or are a multiple of cp); otherwise each rank keeps its query
        shard and gathers keys and values of the whole sequence."""
        m = self.model  # ulysses_heads: the rule parallel/context_parallel.py applies
        return ulysses_heads(m.num_attention_heads // self.tp, max(m.num_key_value_heads // self.tp, 1),
                             self.cp) is not None

    def checkpointed(self, mixer: str, ffn: str) -> bool:
        kinds = set(self.model.activation_checkpointing)
        return "all" in kinds or mixer in kinds or ffn in kinds

    def group_bandwidth(self, size: int, stride: int) -> float:
        """Bytes/s of a collective over `size` ranks `stride` apart: NVLink inside a node, else InfiniBand."""
        g = self.gpu
        inside = size * stride <= g.gpus_per_node
        return (g.link_gbs if inside else g.inter_node_gbs) * 1e9

    def with_(self, **changes) -> "Setup":
        return replace(self, **changes)


def scan_state_interval(batch: int, channels: int, seq_len: int) -> int:
    """Steps between the fp32 states our CUDA scan keeps for its backward (jamba/ops/selective_scan_cuda.py
    `state_interval`): one per 16-step tile while batch x channels x seq (rounded up to tiles) x 4 bytes fits
    1 GiB (2^28 elements), else one per 256 steps. Under cp the scan sees the full sequence for
    d_inner / (tp * cp) channels."""
    tiles = -(-seq_len // 16) * 16
    return 16 if batch * channels * tiles * 4 <= (1 << 30) else 256


def layer_param_counts(m: JambaConfig) -> Tuple[Dict[str, int], List[Tuple[int, int]]]:
    """Parameter counts from the config alone: ({"embedding", "lm_head", "final_norm"}, per layer
    [(dense parameters, expert parameters)]). tests/launch/test_plan.py checks the total against
    jamba.flops.param_counts (which builds the model on the meta device)."""
    H, Di, N, R, K = m.hidden_size, m.d_inner, m.mamba_d_state, m.dt_rank, m.mamba_d_conv
    hq, hkv = m.num_attention_heads * m.attn_head_dim, m.num_key_value_heads * m.attn_head_dim
    pb, cb = int(m.mamba_proj_bias), int(m.mamba_conv_bias)
    mamba = (H * 2 * Di + 2 * Di * pb + Di * K + Di * cb + Di * (R + 2 * N) + R + 2 * N + R * Di + Di
             + Di * N + Di + Di * H + H * pb)
    attn = H * hq + 2 * H * hkv + hq * H
    mlp = 3 * H * m.intermediate_size
    experts = 3 * m.num_experts * H * m.intermediate_size
    layers = []
    for s in m.layer_specs():
        dense = 2 * H + (attn if s.mixer == "attention" else mamba)
        if s.ffn == "moe":
            layers.append((dense + H * m.num_experts, experts))
        else:
            layers.append((dense + mlp, 0))
    top = {"embedding": m.vocab_size * H, "lm_head": 0 if m.tie_word_embeddings else m.vocab_size * H,
           "final_norm": H}
    return top, layers


def human_tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)
