"""JambaForCausalLM: a pre-norm hybrid decoder of Mamba / attention mixers and dense / MoE FFNs.

Module and parameter names mirror transformers' JambaForCausalLM (`model.embed_tokens`,
`model.layers.{i}.{input_layernorm, mamba | self_attn, pre_ff_layernorm, feed_forward}`,
`model.final_layernorm`, `lm_head`), so tensor-parallel plans and HF conversion are name maps.
No torch.distributed here: parallel/ shards this model in place; the one hook for it is
`moe_stats_reduce` (see `JambaForCausalLM.forward`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from jamba.attention import Attention
from jamba.config import JambaConfig, LayerSpec
from jamba.layers import MLP, RMSNorm
from jamba.loss import IGNORE_INDEX, chunked_cross_entropy, shift_labels
from jamba.moe import MoE, GroupedExperts, load_balancing_loss, router_z_loss, split_moe_stats

logger = logging.getLogger(__name__)


class LMHead(nn.Linear):
    """The output projection (vocab_size, hidden). Besides `forward` (logits) it has a second entry point,
    `loss`: the chunked cross-entropy reads the weight directly and never materialises (B, L, V) logits.
    Being a method of this module lets a wrapper that hooks module calls hook the loss too (parallel/
    gives lm_head its own FSDP unit and registers `loss` as one of its forward methods)."""

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
             chunk_size: Optional[int]) -> torch.Tensor:
        return loss_fn(hidden, self.weight, targets, chunk_size=chunk_size)


@dataclass
class JambaOutput:
    """loss = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss (when labels or
    targets are given). logits (B, L, V) only when neither was given. aux_loss / z_loss / expert_counts are None without
    MoE layers; expert_counts (num_moe_layers, E) long, detached: token copies routed to each expert (after
    `moe_stats_reduce`, i.e. global over data-parallel ranks when parallel/ installs an all-reduce)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    expert_counts: Optional[torch.Tensor] = None


def _mixer_class(cfg: JambaConfig):
    from jamba import mamba  # the MAMBA engineer's module

    return {"mamba1": mamba.Mamba1Mixer, "mamba2": getattr(mamba, "Mamba2Mixer", None)}[cfg.mamba_mixer]


def _checkpointed(cfg: JambaConfig, spec: LayerSpec) -> bool:
    kinds = set(cfg.activation_checkpointing)
    return "all" in kinds or spec.mixer in kinds or spec.ffn in kinds


class DecoderLayer(nn.Module):
    """x + mixer(input_layernorm(x)), then h + feed_forward(pre_ff_layernorm(h)).
    forward(hidden (B, L, H), doc_ids) -> (hidden (B, L, H), MoE statistics (2E+2,) or None)."""

    def __init__(self, cfg: JambaConfig, layer_idx: int, spec: LayerSpec):
        super().__init__()
        self.layer_idx, self.spec = layer_idx, spec
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if spec.mixer == "attention":
            self.self_attn = Attention(cfg, layer_idx)
        else:
            mixer_cls = _mixer_class(cfg)
            if mixer_cls is None:
                raise NotImplementedError(f"model.mamba_mixer={cfg.mamba_mixer!r}: jamba.mamba has no such mixer yet")
            self.mamba = mixer_cls(cfg, layer_idx)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.feed_forward = MoE(cfg) if spec.ffn == "moe" else MLP(cfg)
        self.activation_checkpointing = _checkpointed(cfg, spec)

    @property
    def mixer(self) -> nn.Module:
        return self.self_attn if self.spec.mixer == "attention" else self.mamba

    def _forward(self, hidden: torch.Tensor, doc_ids: Optional[torch.Tensor]):
        h = hidden + self.mixer(self.input_layernorm(hidden), doc_ids=doc_ids)
        ff = self.feed_forward(self.pre_ff_layernorm(h))
        if isinstance(ff, tuple):  # MoE: (out, stats)
            return h + ff[0], ff[1]
        return h + ff, None

    def forward(self, hidden: torch.Tensor, doc_ids: Optional[torch.Tensor] = None):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, hidden, doc_ids, use_reentrant=False)
        return self._forward(hidden, doc_ids)


class JambaModel(nn.Module):
    """Embedding, decoder layers, final RMSNorm (HF JambaModel)."""

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        # _weight: skip nn.Embedding's own normal_ init (init_weights does it; on meta it costs seconds)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, s) for i, s in enumerate(cfg.layer_specs()))
        self.final_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    """The Jamba language model. `JambaForCausalLM(cfg)` on a real device is initialised at once; under
    `torch.device("meta")` nothing is allocated: call `to_empty(device=...)` then `init_weights(seed)`.

    `moe_stats_reduce`: None or a callable applied to the stacked MoE statistics (num_moe_layers, 2E+2) fp32,
    columns [counts (E) | router prob sums (E) | z sum | num tokens] (see jamba.moe.split_moe_stats),
    before the load-balancing and z losses are formed. parallel/ sets it to a differentiable sum all-reduce
    over the data-parallel ranks (e.g. torch.distributed.nn.functional.all_reduce) to get global-batch
    statistics; the result must keep the shape.

    `loss_fn(hidden (B, L, H), weight (V, H), targets (B, L), chunk_size=...) -> mean CE` over the targets
    that are not -100 (targets aligned with the positions): the language-model loss,
    `jamba.loss.chunked_cross_entropy` by default (parallel/ installs a vocab-parallel one under TP).

    Two ways to give what the model should predict (exactly one, or neither for logits):
    - `labels` (B, L): transformers' convention, e.g. `model(ids, labels=ids)`: shifted inside (position t
      predicts labels[:, t + 1]; the last position predicts nothing), -100 ignored. Same loss as
      transformers' `JambaForCausalLM` on the same weights.
    - `targets` (B, L): already aligned (position t predicts targets[:, t]), -100 ignored. The trainer uses
      it: its packed rows are windows of L + 1 tokens (input_ids = window[:-1], targets = window[1:]), so
      every token of the stream is predicted exactly once and no row loses its last target. Context
      parallelism needs it too: the sequence is shifted before it is cut into per-rank shards, because the
      target of a shard's last position is the next shard's first token.
    """

    def __init__(self, cfg: JambaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = JambaModel(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.moe_stats_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        # (hidden, lm_head.weight, labels, chunk_size=) -> mean CE; parallel/ swaps in a vocab-parallel one
        self.loss_fn: Callable[..., torch.Tensor] = chunked_cross_entropy
        self.tie_weights()
        if cfg.moe_router_bias_update_rate and (cfg.moe_force_balance
                                                or not any(s.ffn == "moe" for s in cfg.layer_specs())):
            logger.warning("model.moe_router_bias_update_rate=%g has no effect: %s", cfg.moe_router_bias_update_rate,
                           "moe_force_balance routes round-robin" if cfg.moe_force_balance else "no MoE layers")
        if cfg.moe_force_balance:
            logger.warning("model.moe_force_balance=true: every MoE layer routes tokens round-robin, not by its "
                           "router (for benchmarking expert parallelism only; the model does not learn routing). "
                           "Remove it for real training.")
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @property
    def cfg(self) -> JambaConfig:
        return self.config

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialise every parameter (after `to_empty`); `seed` seeds torch's global RNG first.

        | parameter                                              | init                               |
        |--------------------------------------------------------|------------------------------------|
        | nn.Linear weights (q/k/v/o, MLP, router, lm_head,      | normal(0, initializer_range)       |
        |   Mamba in/x/dt/out_proj before the mixer's own rules) |                                    |
        | nn.Linear biases                                       | 0                                  |
        | embed_tokens (shared with lm_head when tied)           | normal(0, initializer_range)       |
        | experts.gate_proj / up_proj / down_proj (stacked)      | normal(0, initializer_range)       |
        | RMSNorm weights (input, pre_ff, final)                 | 1                                  |
        | MoE expert_bias (buffer; moe_router_bias_update_rate)  | 0                                  |
        | Mamba mixers: `reset_parameters()` last (Mamba paper): | dt_proj.weight U(+-dt_rank^-0.5),  |
        |   dt_proj.bias = softplus^-1(dt), dt log-uniform in     | A_log = log(1..N), D = 1, conv1d   |
        |   [dt_min, dt_max]; dt/B/C norms = 1                    | PyTorch default                    |

        Every other submodule with a `reset_parameters()` (other than Linear/Embedding/Conv1d, whose rule
        is above or belongs to their mixer) has it called after the generic rules, so a new mixer brings its
        own init. Same rules as HF's JambaPreTrainedModel._init_weights except the Mamba dt init (HF leaves
        dt_proj at the normal init) and conv1d (HF: PyTorch default as well).
        """
        if seed is not None:
            torch.manual_seed(seed)
        self.tie_weights()
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, GroupedExperts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(p, mean=0.0, std=std)
        if self.config.tie_word_embeddings:  # the embedding's rule wins for the shared matrix
            nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=std)
        for m in self.modules():
            if m is not self and not isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)) \
                    and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> JambaOutput:
        """input_ids (B, L) long; labels (B, L): HF convention, shifted here; targets (B, L): already aligned
        (see the class docstring); -100 = ignore in both; doc_ids (B, L) for document masking in attention
        (cfg.document_masking)."""
        cfg = self.config
        if labels is not None:
            if targets is not None:
                raise ValueError("give labels (HF convention, shifted inside) or targets (already aligned), "
                                 "not both")
            targets = shift_labels(labels, IGNORE_INDEX)  # (B, L)
        h = self.model.embed_tokens(input_ids)  # (B, L, H)
        stats = []
        for layer in self.model.layers:
            h, st = layer(h, doc_ids)
            if st is not None:
                stats.append(st)
        h = self.model.final_layernorm(h)  # (B, L, H)

        out = JambaOutput()
        if stats:
            s = torch.stack(stats)  # (num_moe_layers, 2E+2)
            if self.moe_stats_reduce is not None:
                s = self.moe_stats_reduce(s)
            out.aux_loss = load_balancing_loss(s, cfg.num_experts)
            out.z_loss = router_z_loss(s, cfg.num_experts)
            out.expert_counts = split_moe_stats(s.detach(), cfg.num_experts)[0].round().long()
        if targets is None:
            out.logits = self.lm_head(h)  # (B, L, V)
            return out
        out.lm_loss = self.lm_head.loss(h, targets, self.loss_fn, cfg.loss_chunk_size)
        loss = out.lm_loss
        if out.aux_loss is not None:
            if cfg.router_aux_loss_coef:
                loss = loss + cfg.router_aux_loss_coef * out.aux_loss
            if cfg.router_z_loss_coef:
                loss = loss + cfg.router_z_loss_coef * out.z_loss
        out.loss = loss
        return out

    # ---- training hooks ------------------------------------------------------------------------
    def update_expert_biases(self, expert_counts: torch.Tensor) -> None:
        """After an optimizer step, with `model.moe_router_bias_update_rate` > 0 (auxiliary-loss-free
        balancing, see JambaConfig): move every MoE layer's expert bias towards an even load.
        expert_counts (num_moe_layers, E): the step's token copies per expert summed over its micro-batches,
        global over the data-parallel ranks (`JambaOutput.expert_counts`). A no-op when the rate is 0."""
        rate = self.config.moe_router_bias_update_rate
        if not rate:
            return
        layers = [ly.feed_forward for ly in self.model.layers if isinstance(ly.feed_forward, MoE)]  # stats order
        if expert_counts.shape != (len(layers), self.config.num_experts):
            raise ValueError(f"expert_counts has shape {tuple(expert_counts.shape)}, expected "
                             f"({len(layers)} MoE layers, {self.config.num_experts} experts)")
        for moe, c in zip(layers, expert_counts):
            moe.update_expert_bias(c, rate)

    # ---- accounting ----------------------------------------------------------------------------
    def num_params(self) -> Dict[str, int]:
        """{"total": unique parameters (tied counted once), "active": per token (experts count k/E),
        "embedding": the input embedding table (a lookup, no FLOPs)}."""
        cfg = self.config
        seen, total, expert = set(), 0, 0
        for name, p in self.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if ".experts." in f".{name}":
                expert += p.numel()
        inactive = expert * (cfg.num_experts - cfg.num_experts_per_tok) // max(cfg.num_experts, 1)
        return {"total": total, "active": total - inactive, "embedding": self.model.embed_tokens.weight.numel()}

    @staticmethod
    def weight_decay_filter(name: str, param: torch.Tensor) -> bool:
        """True = decay: weight matrices (Linear, embedding, stacked experts, conv kernels); not biases,
        norm weights, A_log or D."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "D", "bias") or "norm" in name:
            return False
        return param.ndim >= 2
