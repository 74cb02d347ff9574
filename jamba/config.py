"""Typed configuration of a Jamba-style hybrid model, its validation and the named presets.

The layer layout is given either as Jamba's periods/offsets (same semantics as transformers'
`JambaConfig`: layer i is attention iff `i % attn_layer_period == attn_layer_offset`, and MoE iff
`i % expert_layer_period == expert_layer_offset`) or as an explicit `layer_pattern` string with one
two-symbol token per layer (mixer symbol then FFN symbol, e.g. "MD ME MD ME AD ME MD ME"). Both
resolve to the same list of `LayerSpec`s via `JambaConfig.layer_specs()`.

All fields are plain types so the dataclass doubles as the Hydra/OmegaConf schema of `conf/model/`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

MIXER_SYMBOLS = {"M": "mamba", "A": "attention"}
FFN_SYMBOLS = {"D": "mlp", "E": "moe"}
MIXER_TYPES = ("mamba1", "mamba2")
CHECKPOINT_KINDS = ("mamba", "attention", "mlp", "moe")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the fix."""


class LayerSpec(NamedTuple):
    mixer: str  # "mamba" | "attention"
    ffn: str  # "mlp" | "moe"


@dataclass
class JambaConfig:
    """Architecture of a Jamba-style hybrid model. Defaults are Jamba-v0.1 (52B total, 12B active)."""

    vocab_size: int = 65536
    """Vocabulary size (embedding rows and output logits)."""
    hidden_size: int = 4096
    """Model width (residual stream)."""
    num_hidden_layers: int = 32
    """Number of decoder layers (each: one mixer + one FFN, both pre-norm residual)."""
    num_attention_heads: int = 32
    """Query heads of the attention layers."""
    num_key_value_heads: int = 8
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    intermediate_size: int = 14336
    """SwiGLU hidden width of the dense MLP and of each expert."""

    # ---- layer layout --------------------------------------------------------------------------
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    layer_pattern: Optional[str] = None
    """Explicit layout overriding the periods/offsets: one token per layer of a mixer symbol
    (M = Mamba, A = attention) followed by an FFN symbol (D = dense MLP, E = MoE), e.g.
    "MD ME MD ME AD ME MD ME". Whitespace between tokens is optional."""

    # ---- mixture of experts --------------------------------------------------------------------
    num_experts: int = 16
    """Experts per MoE layer (1 disables MoE: every FFN is a dense MLP)."""
    num_experts_per_tok: int = 2
    """Top-k experts per token."""
    moe_renormalize: bool = False
    """Renormalise the top-k router probabilities to sum to 1 (Jamba/HF: False)."""
    router_aux_loss_coef: float = 0.001
    """Coefficient of the load-balancing loss (HF's load_balancing_loss_func) in the total loss."""
    router_z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (mean of logsumexp(router_logits)^2)."""
    moe_force_balance: bool = False
    """Benchmarking only (as Megatron-Core's --moe-router-force-load-balancing): token n's k experts are
    n*k, ..., n*k+k-1 (mod E) instead of the router's top-k, so every expert gets the same number of token
    copies (where E divides the N*k copies of a router call; with moe_token_chunk the count restarts per
    chunk). The router still weights the outputs with its probabilities of those experts and gets gradients,
    but it no longer chooses: the model does not learn routing. Measures expert parallelism at the balance
    a trained router reaches, where a fresh model's routing collapses onto few experts. Never for real
    training."""
    moe_router_bias_update_rate: float = 0.0
    """Auxiliary-loss-free load balancing (DeepSeek-V3; Megatron-Core's --moe-router-bias-update-rate, torchtitan's
    load_balance_coeff): every MoE layer keeps a per-expert bias (the fp32 buffer `expert_bias`, saved with the
    model) that is added to the router probabilities for the top-k choice only; the output weights stay the
    unbiased probabilities. After every optimizer step each bias moves by this rate times sign(mean load -
    expert load), from the step's global expert counts (kept zero-mean), so an overloaded expert is chosen less
    until the loads even out. It needs no gradient and no collective (the counts are already global), and
    keeps expert parallelism's ranks evenly loaded (each all-to-all waits for the busiest one). 0 = off, as HF's
    Jamba (which cannot represent the bias: a model trained with it does not export to HF); 1e-3 as DeepSeek-V3."""
    moe_token_chunk: Optional[int] = None
    """Run each MoE layer over chunks of this many tokens, each recomputed on its own in backward, so only
    one chunk's expert activations are alive at a time (long context); None = all tokens at once."""

    # ---- Mamba ---------------------------------------------------------------------------------
    mamba_mixer: str = "mamba1"
    """"mamba1" (Jamba's selective scan) or "mamba2" (chunked SSD, as Nemotron-H/Bamba/Falcon-H1)."""
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: Optional[int] = None
    """Rank of the dt projection; None means ceil(hidden_size / 16) (HF's "auto")."""
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba2_head_dim: int = 64
    """Mamba-2 only: channels per SSM head (d_inner must be divisible by it)."""
    mamba2_n_groups: int = 1
    """Mamba-2 only: groups sharing B and C."""
    mamba2_chunk_size: int = 256
    """Mamba-2 only: SSD chunk length."""

    # ---- attention -----------------------------------------------------------------------------
    use_rope: bool = False
    """Rotary position embedding on q/k (an ablation; Jamba uses no positional embedding)."""
    rope_theta: float = 10000.0
    document_masking: bool = False
    """Mask attention across document boundaries of packed sequences (needs doc ids at forward)."""

    # ---- misc ----------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights (HF's initializer_range)."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the chunked cross-entropy (never materialises [tokens, vocab] fp32)."""
    activation_checkpointing: List[str] = field(default_factory=list)
    """Layer kinds whose blocks are recomputed in backward: any of mamba, attention, mlp, moe
    (a block is checkpointed if its mixer or its FFN kind is listed), or ["all"]."""

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities --------------------------------------------------------------------
    @property
    def dt_rank(self) -> int:
        return self.mamba_dt_rank if self.mamba_dt_rank is not None else math.ceil(self.hidden_size / 16)

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba2_nheads(self) -> int:
        """Mamba-2 heads: d_inner / mamba2_head_dim (validate checks that it divides)."""
        return self.d_inner // self.mamba2_head_dim

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def layer_specs(self) -> List[LayerSpec]:
        """The (mixer, ffn) kind of every layer, from `layer_pattern` or the periods/offsets."""
        if self.layer_pattern is not None:
            return parse_layer_pattern(self.layer_pattern)
        specs = []
        for i in range(self.num_hidden_layers):
            mixer = "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            moe = self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
            specs.append(LayerSpec(mixer, "moe" if moe else "mlp"))
        return specs

    def layer_pattern_string(self) -> str:
        """The layout as a pattern string (inverse of `parse_layer_pattern`)."""
        inv_m = {v: k for k, v in MIXER_SYMBOLS.items()}
        inv_f = {v: k for k, v in FFN_SYMBOLS.items()}
        return " ".join(inv_m[s.mixer] + inv_f[s.ffn] for s in self.layer_specs())

    def replace(self, **changes) -> "JambaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "num_experts", "num_experts_per_tok",
                     "mamba_d_state", "mamba_d_conv", "mamba_expand", "loss_chunk_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"model.{name}={value!r} must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"model.num_key_value_heads={self.num_key_value_heads} must divide "
             f"model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0,
                 f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                 f"{self.num_attention_heads}; set model.head_dim explicitly or change the head count")
        need(self.num_experts_per_tok <= self.num_experts,
             f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds model.num_experts={self.num_experts}")
        need(self.mamba_mixer in MIXER_TYPES,
             f"model.mamba_mixer={self.mamba_mixer!r} is not one of {list(MIXER_TYPES)}")
        need(self.mamba_dt_rank is None or self.mamba_dt_rank > 0,
             f"model.mamba_dt_rank={self.mamba_dt_rank} must be positive or null (auto = ceil(hidden/16))")
        need(0 < self.mamba_dt_min <= self.mamba_dt_max,
             f"model.mamba_dt_min={self.mamba_dt_min} and mamba_dt_max={self.mamba_dt_max} need 0 < min <= max")
        if self.mamba_mixer == "mamba2":
            need(self.d_inner % self.mamba2_head_dim == 0,
                 f"model.mamba2_head_dim={self.mamba2_head_dim} must divide d_inner = mamba_expand * "
                 f"hidden_size = {self.d_inner}")
            need(self.mamba2_nheads % self.mamba2_n_groups == 0,
                 f"model.mamba2_n_groups={self.mamba2_n_groups} must divide the Mamba-2 head count "
                 f"{self.mamba2_nheads}")
        if self.layer_pattern is None:
            need(self.attn_layer_period > 0 and 0 <= self.attn_layer_offset < self.attn_layer_period,
                 f"model.attn_layer_offset={self.attn_layer_offset} must be in [0, attn_layer_period="
                 f"{self.attn_layer_period})")
            need(self.expert_layer_period > 0 and 0 <= self.expert_layer_offset < self.expert_layer_period,
                 f"model.expert_layer_offset={self.expert_layer_offset} must be in [0, expert_layer_period="
                 f"{self.expert_layer_period})")
        else:
            specs = parse_layer_pattern(self.layer_pattern)
            need(len(specs) == self.num_hidden_layers,
                 f"model.layer_pattern has {len(specs)} layers but model.num_hidden_layers="
                 f"{self.num_hidden_layers}; make them agree")
            if any(s.ffn == "moe" for s in specs):
                need(self.num_experts > 1,
                     f"model.layer_pattern has MoE layers (E) but model.num_experts={self.num_experts}; "
                     "set num_experts > 1 or use D")
        need(math.isfinite(self.moe_router_bias_update_rate) and self.moe_router_bias_update_rate >= 0,
             f"model.moe_router_bias_update_rate={self.moe_router_bias_update_rate} must be >= 0 (0 = off; "
             "1e-3 is DeepSeek-V3's)")
        need(self.moe_token_chunk is None or self.moe_token_chunk > 0,
             f"model.moe_token_chunk={self.moe_token_chunk} must be a positive token count or null (no chunking)")
        kinds = list(self.activation_checkpointing)
        allowed = CHECKPOINT_KINDS + ("all",)
        bad = [k for k in kinds if k not in allowed]
        need(not bad, f"model.activation_checkpointing={kinds} has unknown kinds {bad}; allowed: {list(allowed)}")


def parse_layer_pattern(pattern: str) -> List[LayerSpec]:
    """"MD ME AD ME" -> [LayerSpec('mamba','mlp'), LayerSpec('mamba','moe'), ...]."""
    symbols = "".join(pattern.split())
    if not symbols or len(symbols) % 2:
        raise ConfigError(
            f"model.layer_pattern={pattern!r} must be one two-symbol token per layer: a mixer symbol "
            f"({', '.join(f'{k}={v}' for k, v in MIXER_SYMBOLS.items())}) then an FFN symbol "
            f"({', '.join(f'{k}={v}' for k, v in FFN_SYMBOLS.items())}), e.g. 'MD ME AD ME'")
    specs = []
    for i in range(0, len(symbols), 2):
        m, f = symbols[i].upper(), symbols[i + 1].upper()
        if m not in MIXER_SYMBOLS or f not in FFN_SYMBOLS:
            raise ConfigError(
                f"model.layer_pattern={pattern!r}: layer {i // 2} is {symbols[i:i + 2]!r}; the mixer symbol "
                f"must be one of {sorted(MIXER_SYMBOLS)} and the FFN symbol one of {sorted(FFN_SYMBOLS)}")
        specs.append(LayerSpec(MIXER_SYMBOLS[m], FFN_SYMBOLS[f]))
    return specs


PRESETS = {
    # CI / CPU demo: 0.6M parameters, every layer kind present (attention at layer 2, MoE on odd layers).
    "tiny": dict(vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, attn_layer_period=4, attn_layer_offset=2,
                 expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                 mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, loss_chunk_size=1024),
    # ~100M total parameters: a first real experiment on one GPU.
    "small": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1408, attn_layer_period=8, attn_layer_offset=4,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2),
    # The H100 benchmark shape of the README's Performance section and docs/performance.md (3.0B total, ~1.3B active).
    "bench-3b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=4, intermediate_size=5632, attn_layer_period=8, attn_layer_offset=4,
                     expert_layer_period=2, expert_layer_offset=1, num_experts=8, num_experts_per_tok=2),
    # AI21 Jamba-v0.1: 51.57B total, 12.11B active.
    "jamba-v0.1": dict(vocab_size=65536, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, attn_layer_period=8,
                       attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=16,
                       num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                       mamba_dt_rank=256),
}


def get_preset(name: str, **overrides) -> JambaConfig:
    """A named preset (see PRESETS), with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(JambaConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"unknown model field(s) {bad}; valid fields: {sorted(fields)}")
    return JambaConfig(**{**PRESETS[name], **overrides})
