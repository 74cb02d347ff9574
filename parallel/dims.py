"""`ParallelDims`: validate every parallel degree against the world size and the model, then build
the one device mesh (and its named views) that everything in `parallel/` uses.

Validation needs no process group, so a bad layout fails before `torchrun` workers do any work:

    dims = ParallelDims(ParallelConfig(tp=3), world_size=6, model=get_preset("small"))
    -> ConfigError: parallel.tp=3 must divide model.num_attention_heads=8: choose tp in [1, 2, 4, 8]

Mesh layout (outermost first; tp innermost so a TP group sits on one node's NVLink):

    dense mesh   ("dp_replicate", "dp_shard", "cp", "tp")
      "dp"           = dp_replicate x dp_shard        the data loader's rank/size (cp/tp ranks share a batch)
      "dp_shard_cp"  = dp_shard x cp                  FSDP2 shards dense parameters over it
      "dp_cp"        = dp_replicate x dp_shard x cp   every rank that sees different tokens (loss, MoE stats)
    expert mesh  ("dp_replicate", "efsdp", "ep", "tp") over the same ranks, where efsdp * ep = dp_shard * cp
      "ep"           experts sharded on dim 0; tokens exchanged by all-to-all (contiguous ranks)
      "efsdp"        FSDP2 of the expert parameters ("expert data parallel" within a replica)
      "edp"          = dp_replicate x efsdp: the ranks that hold the same experts (gradients reduced here)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from jamba.config import ConfigError, JambaConfig
from parallel.config import ParallelConfig

DENSE_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")
EXPERT_DIMS = ("dp_replicate", "efsdp", "ep", "tp")


def _divisors(n: int, limit: int = 1 << 30) -> List[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def ulysses_heads(num_q: int, num_kv: int, cp: int) -> Optional[str]:
    """How context parallelism's Ulysses attention splits (TP-local) heads over cp: "shard" (cp divides the kv
    heads), "repeat" (kv heads repeated to cp heads), or None (cp does not divide the query heads: all-gather
    of K/V instead, parallel/context_parallel.py)."""
    if num_q % cp:
        return None
    if num_kv % cp == 0:
        return "shard"
    return "repeat" if cp % num_kv == 0 else None


# Longest sequence for the all-gather-K/V attention fallback with document masking: its explicit mask is up to
# (L / cp) x L per row (without document masking the causal bias is not materialised: no limit).
ALLGATHER_KV_MAX_SEQ = 32768


@dataclass
class ParallelDims:
    """Resolved and validated parallel degrees. `dp_shard=-1` is filled from the world size.

    Args:
        cfg: the `parallel` config group.
        world_size: number of processes; None reads WORLD_SIZE from the environment (default 1).
        model: the model config; when given, every degree is checked against the model's shapes.
        seq_len: the training sequence length, or all of them (curriculum stages); checked against cp
            (and tp with sequence parallelism).
    """

    cfg: ParallelConfig
    world_size: Optional[int] = None
    model: Optional[JambaConfig] = None
    seq_len: Union[int, Sequence[int], None] = None
    dp_replicate: int = field(init=False)
    dp_shard: int = field(init=False)
    cp: int = field(init=False)
    tp: int = field(init=False)
    ep: int = field(init=False)

    def __post_init__(self) -> None:
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        c = self.cfg
        self.dp_replicate, self.cp, self.tp, self.ep = c.dp_replicate, c.cp, c.tp, c.ep
        self.dp_shard = c.dp_shard
        self._meshes: Dict[str, object] = {}
        self._validate_world()
        if self.model is not None:
            self._validate_model(self.model)
        for seq_len in self.seq_lens:
            self.check_seq_len(seq_len)

    # ---- validation (no process group needed) ---------------------------------------------------
    def _validate_world(self) -> None:
        ws, c = self.world_size, self.cfg
        if self.dp_replicate == -1:
            others = self.dp_shard * self.cp * self.tp
            if ws % others:
                raise ConfigError(
                    f"WORLD_SIZE({ws}) is not divisible by dp_shard({self.dp_shard}) * cp({self.cp}) * "
                    f"tp({self.tp}) = {others}, so parallel.dp_replicate=-1 cannot fill it; choose degrees "
                    f"among the divisors of {ws}: {_divisors(ws)}")
            self.dp_replicate = ws // others
        others = self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if ws % others:
                tps = self._model_tps([t for t in _divisors(ws) if ws % (t * self.dp_replicate * self.cp) == 0])
                choose = (f"choose tp in {tps} (dividing {ws}{' and suiting the model' if self.model else ''}), or "
                          if tps else "")
                raise ConfigError(
                    f"WORLD_SIZE({ws}) is not divisible by dp_replicate({self.dp_replicate}) * cp({self.cp}) * "
                    f"tp({self.tp}) = {others}, so parallel.dp_shard=-1 cannot fill it; {choose}launch a multiple "
                    f"of {others} processes")
            self.dp_shard = ws // others
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != ws:
            # Advise only what fixes it: dp_shard=-1 fills WORLD_SIZE only if the other degrees divide it.
            preset = "; the parallel=fsdp preset does that" if others == 1 else ""  # fsdp sets tp, cp... to 1
            fix = (f"set parallel.dp_shard=-1 (fills to {ws // others}{preset})"
                   if ws % others == 0 else f"choose degrees among the divisors of {ws}: {_divisors(ws)}")
            raise ConfigError(
                f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * cp({self.cp}) * tp({self.tp}) "
                f"= {product} != WORLD_SIZE({ws}); {fix}, or launch {product} process{'es' if product > 1 else ''} "
                f"(e.g. launch/single_node.sh -n {product})")
        if (self.dp_shard * self.cp) % self.ep:
            # suggest only sizes that also divide the experts (when the model is known), so the fix is one step
            valid = [e for e in _divisors(self.dp_shard * self.cp)
                     if self.model is None or self.model.num_experts % e == 0]
            raise ConfigError(
                f"parallel.ep={self.ep} must divide dp_shard({self.dp_shard}) * cp({self.cp}) = "
                f"{self.dp_shard * self.cp} (experts are sharded over data-parallel ranks); choose ep in "
                f"{valid} or raise dp_shard")
        if c.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it shards over the TP group)")
        if c.sequence_parallel and self.cp > 1:
            raise ConfigError(f"parallel.sequence_parallel=true with parallel.cp={self.cp} is not supported (both "
                              "shard the sequence); context parallelism already keeps activations at L/cp: set "
                              "parallel.sequence_parallel=false")

    def _validate_model(self, m: JambaConfig) -> None:
        tp, ep = self.tp, self.ep
        specs = m.layer_specs()
        has_attn = any(s.mixer == "attention" for s in specs)
        has_mamba = any(s.mixer == "mamba" for s in specs)
        has_moe = any(s.ffn == "moe" for s in specs)
        valid_tp = self._model_tps(list(range(1, 65)))
        problem = self._tp_problem(m, tp, has_attn, has_mamba)
        if problem is not None:
            hint = f"choose tp in {valid_tp}" if problem[1] else "set parallel.tp=1"
            raise ConfigError(f"{problem[0]}: {hint}")
        if tp > 1 and m.tie_word_embeddings:
            raise ConfigError(f"parallel.tp={tp} with model.tie_word_embeddings=true is not supported yet (the "
                              "vocab-parallel embedding and lm_head are sharded separately); untie the "
                              "embeddings or set parallel.tp=1")
        if ep > 1:
            if not has_moe:
                raise ConfigError(f"parallel.ep={ep} but the model has no MoE layers; set parallel.ep=1")
            if m.num_experts % ep:
                raise ConfigError(
                    f"parallel.ep={ep} must divide model.num_experts={m.num_experts}: choose ep in "
                    f"{[e for e in _divisors(m.num_experts) if (self.dp_shard * self.cp) % e == 0]}")
        if self.cp > 1:
            self._validate_cp(m, has_mamba)

    def _validate_cp(self, m: JambaConfig, has_mamba: bool) -> None:
        """Context parallelism: Mamba-1 channels are split over tp * cp, Mamba-2 heads over cp (see
        parallel/context_parallel.py); attention takes any head count (Ulysses where cp divides the local
        heads, else all-gather of K/V)."""
        cp, tp = self.cp, self.tp
        if has_mamba and m.mamba_mixer == "mamba2":
            from parallel.context_parallel import mamba2_groups

            H, G = m.mamba2_nheads, m.mamba2_n_groups
            if mamba2_groups(H, G, cp, 0) is None:
                valid = [c for c in range(2, min(H, 64) + 1) if mamba2_groups(H, G, c, 0) is not None]
                other = ("a smaller model.mamba2_head_dim for more heads" if H % cp else
                         f"model.mamba2_n_groups dividing or divisible by {cp}")
                raise ConfigError(
                    f"parallel.cp={cp}: the Mamba-2 mixers split their {H} heads (d_inner {m.d_inner} / "
                    f"model.mamba2_head_dim={m.mamba2_head_dim}) over cp, so cp must divide them and each rank's "
                    f"heads must read whole B/C groups or one group (cp divides model.mamba2_n_groups={G} or G "
                    f"divides cp); choose cp in {valid}, or {other}")
        nq, kv = m.num_attention_heads // tp, max(m.num_key_value_heads // tp, 1)  # TP-local heads
        allgather = any(s.mixer == "attention" for s in m.layer_specs()) and ulysses_heads(nq, kv, cp) is None
        if allgather and m.document_masking:
            too_long = [L for L in self.seq_lens if L > ALLGATHER_KV_MAX_SEQ]
            if too_long:
                valid = [c for c in range(2, 65) if ulysses_heads(nq, kv, c) is not None]
                raise ConfigError(
                    f"parallel.cp={cp} does not divide the {nq} query heads per TP rank (model.num_attention_heads="
                    f"{m.num_attention_heads} / tp={tp}), so attention would all-gather K/V, and with "
                    f"model.document_masking=true through a dense (L/cp x L) mask, too large at sequence length "
                    f"{max(too_long)} (limit {ALLGATHER_KV_MAX_SEQ}); choose cp in {valid}, a smaller tp, or "
                    f"model.document_masking=false")
        if has_mamba and m.mamba_mixer == "mamba1" and m.d_inner % (tp * cp):
            valid = _divisors(m.d_inner // tp, 1024) if m.d_inner % tp == 0 else [1]
            raise ConfigError(f"parallel.cp={cp}: d_inner (model.mamba_expand * model.hidden_size = {m.d_inner}) must "
                              f"be divisible by tp({tp}) * cp({cp}) (Mamba channels are split over both); choose "
                              f"cp in {valid}")

    @property
    def seq_lens(self) -> List[int]:
        if self.seq_len is None:
            return []
        return [self.seq_len] if isinstance(self.seq_len, int) else list(self.seq_len)

    def check_seq_len(self, seq_len: int) -> None:
        """Every sequence length the run uses (each curriculum stage) must split over cp (and tp with
        sequence parallelism); raises ConfigError naming the length and the degrees."""
        tp, cp = self.tp, self.cp
        if cp > 1 and seq_len % cp:
            raise ConfigError(
                f"sequence length {seq_len} must be divisible by parallel.cp={cp} (each cp rank holds seq_len / cp "
                f"tokens): use a multiple of {cp} for every curriculum stage, or choose cp in "
                f"{[c for c in _divisors(seq_len, 64) if self.world_size % (c * tp * self.dp_replicate) == 0]}"
                f"{' with parallel.dp_shard=-1 (it fills the rest)' if self.cfg.dp_shard != -1 else ''}")
        if self.cfg.sequence_parallel and seq_len % (tp * cp):
            raise ConfigError(
                f"sequence length {seq_len} must be divisible by tp({tp}) * cp({cp}) with "
                f"parallel.sequence_parallel=true; change the sequence length or turn it off")

    def _model_tps(self, tps: List[int]) -> List[int]:
        """The tensor-parallel degrees among `tps` that the model (when known) can be sharded by."""
        m = self.model
        if m is None:
            return tps
        specs = m.layer_specs()
        has_attn, has_mamba = any(s.mixer == "attention" for s in specs), any(s.mixer == "mamba" for s in specs)
        return [t for t in tps if self._tp_problem(m, t, has_attn, has_mamba) is None]

    @staticmethod
    def _tp_problem(m: JambaConfig, tp: int, has_attn: bool, has_mamba: bool):
        """(message, fixable_by_other_tp) for the first model shape that `tp` cannot shard, else None."""
        if tp == 1:
            return None
        if has_mamba and m.mamba_mixer == "mamba2":
            return (f"parallel.tp={tp}: tensor parallelism of the Mamba-2 mixer is not supported "
                    f"(model.mamba_mixer='mamba2')", False)
        checks = []
        if has_attn:
            checks.append(("model.num_attention_heads", m.num_attention_heads))
        if has_mamba:
            checks.append(("d_inner (model.mamba_expand * model.hidden_size)", m.d_inner))
        checks += [("model.intermediate_size", m.intermediate_size), ("model.vocab_size", m.vocab_size)]
        for name, value in checks:
            if value % tp:
                return f"parallel.tp={tp} must divide {name}={value}", True
        if has_attn:
            kv = m.num_key_value_heads
            if kv % tp and tp % kv:
                return (f"parallel.tp={tp} and model.num_key_value_heads={kv}: tp must divide the kv heads, "
                        f"or be a multiple of them (kv heads are then replicated)", True)
        return None

    # ---- derived degrees -------------------------------------------------------------------------
    @property
    def efsdp(self) -> int:
        """FSDP degree of the expert parameters within a replica (dp_shard * cp / ep)."""
        return self.dp_shard * self.cp // self.ep

    @property
    def dp_size(self) -> int:
        """Number of distinct data-loader shards (ranks of one cp x tp group read the same batch)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def __str__(self) -> str:
        return (f"world={self.world_size} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} cp={self.cp} "
                f"tp={self.tp} ep={self.ep} (expert fsdp={self.efsdp})")

    # ---- meshes ----------------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu"):
        """Create the dense and expert device meshes (needs an initialised default process group).

        Returns the dense DeviceMesh; named views are served by `get_mesh(name)`.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh needs torch.distributed.init_process_group() first")
        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"ParallelDims was validated for WORLD_SIZE({self.world_size}) but the process "
                              f"group has {dist.get_world_size()} ranks")
        ranks = torch.arange(self.world_size)
        dense = DeviceMesh(device_type, ranks.reshape(self.dp_replicate, self.dp_shard, self.cp, self.tp),
                           mesh_dim_names=DENSE_DIMS)
        expert = DeviceMesh(device_type, ranks.reshape(self.dp_replicate, self.efsdp, self.ep, self.tp),
                            mesh_dim_names=EXPERT_DIMS)
        m = self._meshes
        m["dense"], m["expert"] = dense, expert
        for name in DENSE_DIMS:
            m[name] = dense[name]
        m["dp"] = dense["dp_replicate", "dp_shard"]._flatten("dp")
        m["dp_shard_cp"] = dense["dp_shard", "cp"]._flatten("dp_shard_cp")
        m["dp_cp"] = dense["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        m["efsdp"], m["ep"], m["etp"] = expert["efsdp"], expert["ep"], expert["tp"]
        m["edp"] = expert["dp_replicate", "efsdp"]._flatten("edp")
        return dense

    def ep_rank_groups(self) -> List[List[int]]:
        """Every EP group's global ranks, as the expert mesh ("dp_replicate", "efsdp", "ep", "tp") lays them out:
        the ranks that differ only in their "ep" coordinate. No process group needed (for creating more groups
        over the same ranks: every rank must create all of them, in the same order)."""
        ranks = torch.arange(self.world_size).reshape(self.dp_replicate, self.efsdp, self.ep, self.tp)
        return ranks.transpose(2, 3).reshape(-1, self.ep).tolist()

    def get_mesh(self, name: str):
        """A named view: dense dims, "dp", "dp_shard_cp", "dp_cp", "ep", "efsdp", "edp", "etp",
        or the whole "dense" / "expert" meshes."""
        if not self._meshes:
            raise RuntimeError("call ParallelDims.build_mesh(device_type) first")
        if name not in self._meshes:
            raise KeyError(f"unknown mesh {name!r}; available: {sorted(self._meshes)}")
        return self._meshes[name]

    @property
    def dp_rank(self) -> int:
        """This rank's data-loader shard index in [0, dp_size) (no mesh needed: the dense mesh is the
        row-major layout (dp_replicate, dp_shard, cp, tp) of the global ranks, so it is rank // (cp * tp))."""
        import torch.distributed as dist

        if self.dp_size == 1:
            return 0
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        return rank // (self.cp * self.tp)
