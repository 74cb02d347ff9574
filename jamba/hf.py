"""Conversion between our `JambaForCausalLM` and transformers' `JambaForCausalLM` (config, weights, files).

Our parameter names mirror transformers' except two layouts, converted here:

    ours                                               transformers 5.x                 transformers 4.x files
    ...feed_forward.experts.gate_proj [E, I, H]   \\    ...experts.gate_up_proj        ...experts.{j}.gate_proj.weight
    ...feed_forward.experts.up_proj   [E, I, H]   /     [E, 2I, H] (gate rows, then up) ...experts.{j}.up_proj.weight
    ...feed_forward.experts.down_proj [E, H, I]         ...experts.down_proj [E, H, I]  ...experts.{j}.down_proj.weight
    ...mamba.in_proj.{weight,bias} rows interleaved     rows [x (d_inner); z (d_inner)]
       (row 2c = x channel c, row 2c+1 = z channel c)

Import accepts both HF layouts; export writes the 5.x layout (what transformers >= 5 loads natively).
Options of ours without an HF equivalent (RoPE, Mamba-2, renormalised top-k, a head_dim other than
hidden/heads, a layer pattern not expressible as periods/offsets, expert biases, forced round-robin routing)
raise `ConfigError` on export.

Command line (run from the repository root):

    python -m jamba.hf export CHECKPOINT OUT_DIR [--config CFG] [--dtype bf16] [--tokenizer SP_MODEL]
    python -m jamba.hf import HF_DIR OUT [--dtype bf16] [--max-shard-size 5GB]

HF_DIR is a local folder (config.json + safetensors), not a hub id: nothing is downloaded (get one with
`hf download ai21labs/Jamba-v0.1 --local-dir DIR` on a machine with network).

CHECKPOINT is one of: a directory written by `import` (jamba_config.json + safetensors), a torch
Distributed Checkpoint directory (has `.metadata`; only the model's tensors are read), or a `.pt` /
`.safetensors` state-dict file. Its model config comes from --config (JSON/YAML file of our
`JambaConfig` fields, a Hydra config with a `model:` section, or a preset name) or is looked for next to
it. Files are read lazily (safetensors memory map, shard by shard) so a 52B checkpoint converts without
twice its size in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from jamba.config import ConfigError, JambaConfig, get_preset

log = logging.getLogger(__name__)

OUR_CONFIG_NAME = "jamba_config.json"
"""Our `JambaConfig` as JSON, written beside our safetensors and beside an exported HF checkpoint."""
SAFE_INDEX_NAME = "model.safetensors.index.json"
SAFE_SINGLE_NAME = "model.safetensors"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# HF config fields that are pure metadata for us (not part of our JambaConfig).
_HF_ONLY_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings", "use_mamba_kernels")


# ================================================================================================
# Config conversion
# ================================================================================================

def _find_period_offset(flags: Sequence[bool]) -> Optional[Tuple[int, int]]:
    """Smallest (period, offset) with `flags[i] == (i % period == offset)` for every layer, or None.
    period = n + 1, offset = n expresses "no layer"."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    return None


def config_to_hf(cfg: JambaConfig, *, use_mamba_kernels: bool = True, **hf_overrides):
    """Our `JambaConfig` -> `transformers.JambaConfig` (raises ConfigError for options HF cannot express).

    `hf_overrides` go straight to transformers' config (e.g. pad_token_id, eos_token_id,
    max_position_embeddings). Training-only fields of ours (z-loss, loss chunking, activation
    checkpointing, init ranges) do not change the function the model computes and are not exported;
    `export` keeps the whole config of ours in jamba_config.json beside config.json.
    """
    import transformers

    def unsupported(key, value, why, fix=""):
        raise ConfigError(f"model.{key}={value!r} has no equivalent in transformers' JambaForCausalLM ({why}); "
                          f"this model cannot be exported to the HF format{fix}")

    if cfg.mamba_mixer != "mamba1":
        unsupported("mamba_mixer", cfg.mamba_mixer, "HF Jamba only has the Mamba-1 mixer")
    if cfg.moe_router_bias_update_rate:
        unsupported("moe_router_bias_update_rate", cfg.moe_router_bias_update_rate,
                    "its router has no expert bias, so the exported model would route tokens differently")
    if cfg.moe_force_balance:
        # The checkpoint holds no trace of it (no buffer): only the run's config says so. HF picks each token's
        # experts by the router's top-k, which this model never used, so its logits would differ.
        unsupported("moe_force_balance", cfg.moe_force_balance,
                    "its MoE layers route by the router's top-k, while this model routed tokens round-robin",
                    "; moe_force_balance is for benchmarking only: train without it for a model to export")
    if cfg.use_rope:
        unsupported("use_rope", cfg.use_rope, "HF Jamba attention has no positional embedding")
    if cfg.moe_renormalize:
        unsupported("moe_renormalize", cfg.moe_renormalize, "HF Jamba does not renormalise the top-k weights")
    if cfg.head_dim is not None and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        unsupported("head_dim", cfg.head_dim, f"HF Jamba uses hidden_size // num_attention_heads = "
                                              f"{cfg.hidden_size // cfg.num_attention_heads}")
    if cfg.router_z_loss_coef:
        log.warning("model.router_z_loss_coef=%s is a training loss HF Jamba does not have; the exported "
                    "model computes the same logits, only HF's training loss omits the z-loss",
                    cfg.router_z_loss_coef)

    specs = cfg.layer_specs()
    n = cfg.num_hidden_layers
    if cfg.layer_pattern is None:
        attn_po = (cfg.attn_layer_period, cfg.attn_layer_offset)
        exp_po = (cfg.expert_layer_period, cfg.expert_layer_offset)
    else:
        attn_po = _find_period_offset([s.mixer == "attention" for s in specs])
        exp_po = _find_period_offset([s.ffn == "moe" for s in specs])
        if attn_po is None or exp_po is None:
            which = "attention" if attn_po is None else "MoE"
            raise ConfigError(
                f"model.layer_pattern={cfg.layer_pattern!r}: its {which} layers are not periodic (layer i is "
                f"{which} iff i % period == offset), which is the only layout transformers' JambaConfig can "
                "express; use a periodic pattern or attn_layer_period/offset and expert_layer_period/offset")
    num_experts = cfg.num_experts
    top_k = cfg.num_experts_per_tok
    if not any(s.ffn == "moe" for s in specs):
        num_experts, top_k = 1, 1  # dense everywhere: HF's num_experts=1 builds JambaMLP in every layer
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=n, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, hidden_act="silu", initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        router_aux_loss_coef=cfg.router_aux_loss_coef, num_experts=num_experts, num_experts_per_tok=top_k,
        attn_layer_period=attn_po[0], attn_layer_offset=attn_po[1],
        expert_layer_period=exp_po[0], expert_layer_offset=exp_po[1],
        mamba_d_state=cfg.mamba_d_state, mamba_d_conv=cfg.mamba_d_conv, mamba_expand=cfg.mamba_expand,
        mamba_dt_rank=cfg.dt_rank, mamba_conv_bias=cfg.mamba_conv_bias, mamba_proj_bias=cfg.mamba_proj_bias,
        use_mamba_kernels=use_mamba_kernels, attention_dropout=0.0, use_cache=True,
        architectures=["JambaForCausalLM"],
    )
    kwargs.update(hf_overrides)
    hf_cfg = transformers.JambaConfig(**kwargs)
    # Check the layout HF will build is ours.
    hf_specs = [(t, "moe" if e > 1 else "mlp") for t, e in zip(hf_cfg.layers_block_type, hf_cfg.layers_num_experts)]
    ours = [(s.mixer, s.ffn) for s in specs]
    if hf_specs != ours:  # pragma: no cover - guards the conversion logic itself
        raise ConfigError(f"internal error: HF layout {hf_specs} != ours {ours}")
    return hf_cfg


def config_from_hf(hf_cfg, base: Optional[JambaConfig] = None) -> JambaConfig:
    """`transformers.JambaConfig` (or its dict / config.json path) -> our `JambaConfig`.

    `base` supplies our fields HF does not have (training-only options, e.g. from the jamba_config.json
    that `export` writes); the architecture always comes from `hf_cfg`.
    """
    if isinstance(hf_cfg, (str, os.PathLike)):
        hf_cfg = json.loads(Path(hf_cfg).read_text())
    d = dict(hf_cfg) if isinstance(hf_cfg, Mapping) else hf_cfg.to_dict()
    if d.get("model_type", "jamba") != "jamba":
        raise ConfigError(f"config model_type={d.get('model_type')!r} is not 'jamba'; only Jamba checkpoints convert")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"HF config hidden_act={act!r}: our model only implements SwiGLU (silu)")
    hidden, heads = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ConfigError(f"HF config head_dim={head_dim} != hidden_size // num_attention_heads; unsupported")
    num_experts = d.get("num_experts", d.get("num_local_experts", 16))
    top_k = d.get("num_experts_per_tok", 2)
    if num_experts <= 1:
        num_experts, top_k = 1, 1
    dt_rank = d.get("mamba_dt_rank", "auto")
    if dt_rank == "auto":
        dt_rank = math.ceil(hidden / 16)
    kv = d.get("num_key_value_heads") or heads
    arch = dict(
        vocab_size=d.get("vocab_size", 65536), hidden_size=hidden, num_hidden_layers=d.get("num_hidden_layers", 32),
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=None,
        intermediate_size=d.get("intermediate_size", 14336),
        attn_layer_period=d.get("attn_layer_period", 8), attn_layer_offset=d.get("attn_layer_offset", 4),
        expert_layer_period=d.get("expert_layer_period", 2), expert_layer_offset=d.get("expert_layer_offset", 1),
        layer_pattern=None, num_experts=num_experts, num_experts_per_tok=min(top_k, num_experts),
        moe_renormalize=False, router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
        mamba_mixer="mamba1", mamba_d_state=d.get("mamba_d_state", 16), mamba_d_conv=d.get("mamba_d_conv", 4),
        mamba_expand=d.get("mamba_expand", 2), mamba_dt_rank=dt_rank,
        mamba_conv_bias=d.get("mamba_conv_bias", True), mamba_proj_bias=d.get("mamba_proj_bias", False),
        use_rope=False, moe_force_balance=False,  # HF routes by the router, whatever a base config says
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        initializer_range=d.get("initializer_range", 0.02),
    )
    if base is None:
        return JambaConfig(**arch)
    cfg = dataclasses.replace(base, **arch)
    if base.layer_pattern is not None and base.layer_specs() == cfg.layer_specs():
        cfg = dataclasses.replace(cfg, layer_pattern=base.layer_pattern)  # keep the user's spelling
    return cfg


def load_our_config(source) -> JambaConfig:
    """Our JambaConfig from a JambaConfig, a dict of its fields, a preset name, or a JSON/YAML file
    (either the fields themselves, or a Hydra/train config with a `model:` section; a `preset` key
    selects a preset that the other keys override)."""
    if isinstance(source, JambaConfig):
        return source
    if isinstance(source, Mapping):
        d = dict(source)
    else:
        s = str(source)
        path = Path(s)
        if not path.exists():
            from jamba.config import PRESETS
            if s in PRESETS:
                return get_preset(s)
            raise ConfigError(f"--config {s!r} is neither a file nor a preset (presets: {sorted(PRESETS)})")
        if path.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf
            d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        else:
            d = json.loads(path.read_text())
    if isinstance(d.get("model"), Mapping):
        d = dict(d["model"])
    fields = {f.name for f in dataclasses.fields(JambaConfig)}
    preset = d.pop("preset", None)
    ignored = sorted(k for k in d if k not in fields)
    if ignored:
        log.warning("ignoring keys that are not JambaConfig fields: %s", ignored)
    d = {k: v for k, v in d.items() if k in fields}
    return get_preset(preset, **d) if preset else JambaConfig(**d)


# ================================================================================================
# State-dict conversion (pure functions over keys; the tensors are fetched lazily)
# ================================================================================================

# A plan entry: (target key, source keys, function of the source tensors in that order).
Plan = List[Tuple[str, List[str], Callable[[List[torch.Tensor]], torch.Tensor]]]

_EXP_OURS = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_proj|up_proj|down_proj)$")
_EXP_HF5 = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")
_EXP_HF4 = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IN_PROJ = re.compile(r"^.*\.mamba\.in_proj\.(weight|bias)$")


def interleave_in_proj(t: torch.Tensor) -> torch.Tensor:
    """HF rows [x; z] (2*d_inner, ...) -> ours (row 2c = x_c, row 2c+1 = z_c)."""
    d = t.shape[0] // 2
    return t.reshape(2, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def deinterleave_in_proj(t: torch.Tensor) -> torch.Tensor:
    """Ours (row 2c = x_c, row 2c+1 = z_c) -> HF rows [x; z]."""
    d = t.shape[0] // 2
    return t.reshape(d, 2, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _identity(ts):
    return ts[0]


def _check_mamba1(cfg: JambaConfig) -> None:
    if cfg.mamba_mixer != "mamba1":
        raise ConfigError(f"model.mamba_mixer={cfg.mamba_mixer!r}: HF Jamba only has Mamba-1 layers")


def plan_to_hf(our_keys: Iterable[str], cfg: JambaConfig) -> Plan:
    """How to build each HF (5.x layout) tensor from ours."""
    _check_mamba1(cfg)
    keys = list(our_keys)
    keyset = set(keys)
    plan: Plan = []
    for k in keys:
        m = _EXP_OURS.match(k)
        if m:
            prefix, name = m.groups()
            if name == "gate_proj":
                up = f"{prefix}.up_proj"
                if up not in keyset:
                    raise KeyError(f"{k} has no matching {up} in the state dict")
                plan.append((f"{prefix}.gate_up_proj", [k, up], lambda ts: torch.cat(ts, dim=1)))
            elif name == "down_proj":
                plan.append((k, [k], _identity))
            continue  # up_proj is consumed by gate_proj
        if _IN_PROJ.match(k):
            plan.append((k, [k], lambda ts: deinterleave_in_proj(ts[0])))
        elif k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: HF re-ties lm_head to model.embed_tokens on load
        else:
            plan.append((k, [k], _identity))
    return plan


def plan_from_hf(hf_keys: Iterable[str], cfg: JambaConfig) -> Plan:
    """How to build each of our tensors from an HF state dict in the 5.x or the 4.x expert layout."""
    _check_mamba1(cfg)
    keys = list(hf_keys)
    plan: Plan = []
    per_expert: Dict[Tuple[str, str], Dict[int, str]] = {}
    order: List[Tuple[str, str]] = []
    for k in keys:
        m4 = _EXP_HF4.match(k)
        if m4:
            prefix, j, name = m4.groups()
            group = (prefix, name)
            if group not in per_expert:
                per_expert[group] = {}
                order.append(group)
                plan.append((f"{prefix}.{name}", [], None))  # placeholder, filled below (keeps key order)
            per_expert[group][int(j)] = k
            continue
        m5 = _EXP_HF5.match(k)
        if m5:
            prefix, name = m5.groups()
            if name == "gate_up_proj":
                plan.append((f"{prefix}.gate_proj", [k], lambda ts: ts[0].chunk(2, dim=1)[0].contiguous()))
                plan.append((f"{prefix}.up_proj", [k], lambda ts: ts[0].chunk(2, dim=1)[1].contiguous()))
            else:
                plan.append((k, [k], _identity))
            continue
        if _IN_PROJ.match(k):
            plan.append((k, [k], lambda ts: interleave_in_proj(ts[0])))
        else:
            plan.append((k, [k], _identity))
    for i, (target, srcs, fn) in enumerate(plan):
        if fn is None:
            prefix, name = target.rsplit(".", 1)
            experts = per_expert[(prefix, name)]
            if sorted(experts) != list(range(cfg.num_experts)):
                raise KeyError(f"{prefix}.*.{name}.weight: found experts {sorted(experts)}, expected "
                               f"0..{cfg.num_experts - 1} (num_experts={cfg.num_experts})")
            plan[i] = (target, [experts[j] for j in range(cfg.num_experts)], lambda ts: torch.stack(ts, dim=0))
    if cfg.tie_word_embeddings:
        plan = [p for p in plan if p[0] != "lm_head.weight"]
    return plan


def run_plan(plan: Plan, get: Callable[[str], torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (target key, tensor) one at a time, fetching sources with `get` (lazy: one entry in memory)."""
    for target, srcs, fn in plan:
        yield target, fn([get(s) for s in srcs])


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: JambaConfig, layout: str = "5.x") -> Dict[str, torch.Tensor]:
    """Our state dict -> transformers JambaForCausalLM state dict (lm_head omitted when tied), in the
    stacked 5.x expert layout or the per-expert 4.x layout (layout="4.x")."""
    items = run_plan(plan_to_hf(sd.keys(), cfg), sd.__getitem__)
    return dict(split_experts_4x(items) if layout == "4.x" else items)


def split_experts_4x(items: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF 5.x (key, tensor) pairs -> the 4.x per-expert layout (`experts.{j}.{gate,up,down}_proj.weight`),
    which transformers 4.x loads and 5.x converts on load."""
    for k, v in items:
        if k.endswith(".experts.gate_up_proj"):
            prefix = k[: -len(".gate_up_proj")]
            gate, up = v.chunk(2, dim=1)
            for j in range(v.shape[0]):
                yield f"{prefix}.{j}.gate_proj.weight", gate[j].contiguous()
                yield f"{prefix}.{j}.up_proj.weight", up[j].contiguous()
        elif k.endswith(".experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for j in range(v.shape[0]):
                yield f"{prefix}.{j}.down_proj.weight", v[j].contiguous()
        else:
            yield k, v


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], cfg: JambaConfig) -> Dict[str, torch.Tensor]:
    """HF JambaForCausalLM state dict (5.x stacked or 4.x per-expert layout) -> ours (lm_head omitted when tied)."""
    return dict(run_plan(plan_from_hf(sd.keys(), cfg), sd.__getitem__))


# ================================================================================================
# safetensors IO (single file or sharded with an index; lazy reads)
# ================================================================================================

class SafetensorsSource:
    """Lazy read access to a safetensors checkpoint: a file, or a directory with model.safetensors or
    model.safetensors.index.json (sharded). `get(key)` reads one tensor (memory-mapped)."""

    def __init__(self, path):
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            if (path / SAFE_INDEX_NAME).exists():
                index = json.loads((path / SAFE_INDEX_NAME).read_text())
                self.key_to_file = {k: path / f for k, f in index["weight_map"].items()}
            elif (path / SAFE_SINGLE_NAME).exists():
                self.key_to_file = None
                path = path / SAFE_SINGLE_NAME
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"{path} has no {SAFE_INDEX_NAME}, {SAFE_SINGLE_NAME} or *.safetensors")
                self.key_to_file = {}
                for f in files:
                    with safe_open(str(f), framework="pt") as h:
                        self.key_to_file.update({k: f for k in h.keys()})
        else:
            self.key_to_file = None
        if self.key_to_file is None:
            with safe_open(str(path), framework="pt") as h:
                self.key_to_file = {k: path for k in h.keys()}
        self._handles = {}
        self._safe_open = safe_open

    def keys(self) -> List[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        f = self.key_to_file[key]
        if f not in self._handles:
            self._handles[f] = self._safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def _parse_size(size) -> int:
    """Bytes of a shard size like '5GB' (ConfigError, a ValueError, naming the value otherwise)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(size).upper())
    if not m:
        raise ConfigError(f"--max-shard-size {str(size)!r} is not a size: give a number of bytes or one with "
                          f"KB, MB, GB or TB, e.g. 5GB or 500MB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def save_safetensors(items: Iterable[Tuple[str, torch.Tensor]], out_dir, max_shard_size="5GB",
                     dtype: Optional[torch.dtype] = None) -> List[str]:
    """Write (key, tensor) pairs as HF-style safetensors: model.safetensors if it fits in one shard,
    else model-0000i-of-0000n.safetensors + model.safetensors.index.json. Consumes `items` lazily and
    holds at most one shard in memory. Returns the file names."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tmp_names: List[str] = []
    weight_map: Dict[str, int] = {}
    total = 0
    cur: Dict[str, torch.Tensor] = {}
    cur_size = 0

    def flush():
        nonlocal cur, cur_size
        if cur:
            name = f".tmp-shard-{len(tmp_names):05d}.safetensors"
            save_file(cur, str(out_dir / name), metadata={"format": "pt"})
            tmp_names.append(name)
            cur, cur_size = {}, 0

    for key, t in items:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if cur and cur_size + nbytes > limit:
            flush()
        if key in weight_map or key in cur:
            raise KeyError(f"duplicate tensor key {key}")
        cur[key] = t
        cur_size += nbytes
        total += nbytes
        weight_map[key] = len(tmp_names)
    flush()
    n = len(tmp_names)
    for stale in [SAFE_SINGLE_NAME, SAFE_INDEX_NAME, *[p.name for p in out_dir.glob("model-*-of-*.safetensors")]]:
        if (out_dir / stale).exists():
            (out_dir / stale).unlink()
    if n == 1:
        os.replace(out_dir / tmp_names[0], out_dir / SAFE_SINGLE_NAME)
        return [SAFE_SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, name in zip(tmp_names, names):
        os.replace(out_dir / tmp, out_dir / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    (out_dir / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [SAFE_INDEX_NAME]


# ================================================================================================
# Models
# ================================================================================================

def _model_config(model) -> JambaConfig:
    for attr in ("config", "cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, JambaConfig):
            return cfg
    raise TypeError(f"{type(model).__name__} has no JambaConfig at .config / .cfg")


def _tie(model) -> None:
    """Re-tie lm_head to the embedding after `load_state_dict(assign=True)` replaced the parameters."""
    model.lm_head.weight = model.model.embed_tokens.weight


def load_into(model, tensors: Iterable[Tuple[str, torch.Tensor]], *, assign: bool = False) -> None:
    """Load our-layout (key, tensor) pairs into our model, checking every parameter is set exactly once
    (lm_head may be absent when the embeddings are tied)."""
    cfg = _model_config(model)
    sd = dict(tensors)
    expected = set(model.state_dict().keys())
    tied = cfg.tie_word_embeddings
    if tied and "lm_head.weight" in expected and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model config: missing {missing[:8]}"
                       f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{'...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(sd, strict=True, assign=assign)
    if tied:
        _tie(model)


def build_model(cfg: JambaConfig, *, device="cpu", dtype: Optional[torch.dtype] = None, empty: bool = False):
    """Our JambaForCausalLM; with empty=True built on the meta device (parameters to be assigned)."""
    from jamba.model import JambaForCausalLM

    if empty:
        with torch.device("meta"):
            return JambaForCausalLM(cfg)
    with torch.device(device):
        model = JambaForCausalLM(cfg)
    return model.to(dtype) if dtype is not None else model


def _materialise(model, tensors, dtype, device):
    """Assign `tensors` into a meta-built model (no second copy), then check nothing stayed on meta."""
    def cast():
        for k, t in tensors:
            # the MoE expert biases stay at least fp32 (as under model.to(dtype)): a bf16 bias would change the
            # routing
            if dtype is not None and t.is_floating_point():
                t = t.to(torch.promote_types(dtype, torch.float32) if k.endswith("expert_bias") else dtype)
            yield k, t.to(device)
    load_into(model, cast(), assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not set from the checkpoint: {left[:8]}")
    return model


def load_hf(hf_dir, *, dtype: Optional[torch.dtype] = None, device="cpu"):
    """Our JambaForCausalLM (eval mode) from an HF Jamba directory (config.json + safetensors, either
    expert layout). `model(input_ids).logits` is [B, L, V]. dtype None keeps the checkpoint's dtype.
    Tensors are read shard by shard and assigned into a meta-built model: memory is one copy of the weights."""
    hf_dir = _check_hf_dir(hf_dir)
    base = None
    if (hf_dir / OUR_CONFIG_NAME).exists():
        base = load_our_config(hf_dir / OUR_CONFIG_NAME)
    cfg = config_from_hf(hf_dir / "config.json", base=base)
    src = SafetensorsSource(hf_dir)
    model = build_model(cfg, empty=True)
    _materialise(model, run_plan(plan_from_hf(src.keys(), cfg), src.get), dtype, device)
    src.close()
    return model.eval()


def from_hf(hf_model, base: Optional[JambaConfig] = None):
    """Our JambaForCausalLM with the weights of a transformers JambaForCausalLM (same dtype/device)."""
    cfg = config_from_hf(hf_model.config, base=base)
    p = next(hf_model.parameters())
    model = build_model(cfg, empty=True)
    _materialise(model, state_dict_from_hf(hf_model.state_dict(), cfg).items(), p.dtype, p.device)
    return model.train(hf_model.training)


def to_hf(model, *, use_mamba_kernels: bool = True, attn_implementation: str = "eager", **hf_overrides):
    """A transformers.JambaForCausalLM with the weights of our model (same dtype/device; the tensors are
    copies, so HF's model is independent). Built on the meta device, so no random init is spent.
    pad_token_id defaults to None here (no embedding padding_idx, whose gradient HF would zero).
    For benchmarks on CUDA pass attn_implementation="sdpa"; use_mamba_kernels=True (HF's default) lets
    transformers use mamba-ssm/causal-conv1d where installed (a no-op flag from transformers 5.2x on)."""
    import transformers

    cfg = _model_config(model)
    hf_overrides.setdefault("pad_token_id", None)
    hf_cfg = config_to_hf(cfg, use_mamba_kernels=use_mamba_kernels, **hf_overrides)
    hf_cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        hf_model = transformers.JambaForCausalLM(hf_cfg)
    sd = {k: v.detach().clone() for k, v in state_dict_to_hf(model.state_dict(), cfg).items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf_model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise KeyError(f"HF model keys differ: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        hf_model.lm_head.weight = hf_model.model.embed_tokens.weight
    left = [n for n, t in list(hf_model.named_parameters()) + list(hf_model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"HF model tensors left unset: {left[:8]}")
    return hf_model.train(model.training)


def hf_expected_keys(hf_cfg) -> List[str]:
    """The state-dict keys transformers' JambaForCausalLM has for `hf_cfg` (built on meta: instant)."""
    import transformers

    with torch.device("meta"):
        m = transformers.JambaForCausalLM(hf_cfg)
    keys = list(m.state_dict().keys())
    if hf_cfg.tie_word_embeddings:
        keys.remove("lm_head.weight")
    return keys


# ================================================================================================
# Our checkpoints: read (DCP / .pt / .safetensors / directory) and write
# ================================================================================================

def _find_config_near(path: Path) -> Optional[Path]:
    """jamba_config.json, or a Hydra config (config.yaml, .hydra/config.yaml) in the checkpoint directory
    or up to three parent directories (checkpoints usually live in <run>/checkpoints/step_N)."""
    start = path if path.is_dir() else path.parent
    for d in [start, *list(start.parents)[:3]]:
        for name in (OUR_CONFIG_NAME, "config.yaml", ".hydra/config.yaml", "config.json"):
            p = d / name
            if p.exists() and not (name == "config.json" and _is_hf_config(p)):
                return p
    return None


def _is_hf_config(p: Path) -> bool:
    try:
        return "model_type" in json.loads(p.read_text())
    except (ValueError, OSError):
        return False


def _strip_prefix(keys: Iterable[str], anchor: str = "model.embed_tokens.weight") -> str:
    """The prefix before our parameter names in a training checkpoint (e.g. 'model.' for {'model': sd})."""
    prefixes = [k[: -len(anchor)] for k in keys if k.endswith(anchor)]
    if prefixes:
        return min(prefixes, key=len)  # e.g. "model." of {"model": ..., "optim": {"state": {...}}}
    raise KeyError(f"no '*{anchor}' tensor found: not a checkpoint of our JambaForCausalLM")


def open_our_checkpoint(path, cfg: JambaConfig) -> Tuple[List[str], Callable[[str], torch.Tensor]]:
    """(keys, get) over our model's tensors in a training checkpoint: a torch Distributed Checkpoint
    directory (only the model tensors are read, unsharded, no process group needed), a directory of
    our safetensors, or a .pt / .safetensors file (a state dict, possibly nested, e.g. under 'model').
    safetensors and .pt are read lazily (memory map); DCP is loaded once (the model's tensors only)."""
    path = Path(path)
    for ckpts in (path / "checkpoints", path):  # a run directory, or its checkpoints/: name the checkpoint to give
        # complete ones only, as trainer/checkpoint.py names and marks them (step_<n>/COMPLETE; not step_12.bak)
        steps = sorted((int(m.group(1)), d) for d in (ckpts.iterdir() if ckpts.is_dir() else [])
                       for m in [re.match(r"^step_(\d+)$", d.name)] if m and (d / "COMPLETE").exists())
        if steps and not (path / ".metadata").exists():
            raise ConfigError(f"{path} holds training checkpoints, not one: give one of them, e.g. the newest, "
                              f"{steps[-1][1]}")
    if path.is_dir() and (path / ".metadata").exists():
        sd = _read_dcp(path, cfg)
        return list(sd), sd.__getitem__
    if path.is_dir() or path.suffix == ".safetensors":
        src = SafetensorsSource(path)
        prefix = _strip_prefix(src.keys())
        keys = [k[len(prefix):] for k in src.keys() if k.startswith(prefix)]
        _check_expert_biases(path, keys, cfg)
        return keys, lambda k: src.get(prefix + k)
    obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    flat = _flatten(obj)
    prefix = _strip_prefix(flat.keys())
    sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    _check_expert_biases(path, sd, cfg)
    return list(sd), sd.__getitem__


def _check_expert_biases(path: Path, keys: Iterable[str], cfg: JambaConfig) -> None:
    """A checkpoint trained with model.moe_router_bias_update_rate > 0 routes with its MoE `expert_bias`
    buffers; read with a config that has the rate at 0 (a preset, say) the model would have no biases and route
    differently from the trained one, so refuse and say which config to pass."""
    biased = sorted(k for k in keys if k.endswith("expert_bias"))
    if biased and not cfg.moe_router_bias_update_rate:
        raise ConfigError(
            f"{path} holds {len(biased)} MoE expert biases (e.g. {biased[0]!r}: it trained with "
            f"model.moe_router_bias_update_rate > 0), but the model config given has the rate at 0, so the model "
            f"would route tokens without them. Pass the config this checkpoint trained with (--config: the run's "
            f".hydra/config.yaml or jamba_config.json, or, if the run turned the rate off later, those settings "
            f"with moe_router_bias_update_rate set to the rate it trained with)")


def read_our_checkpoint(path, cfg: JambaConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Our model's (key, tensor) pairs from a training checkpoint (see open_our_checkpoint), one at a time."""
    keys, get = open_our_checkpoint(path, cfg)
    for k in keys:
        yield k, get(k)


def _flatten(obj, prefix="") -> Dict[str, object]:
    out = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _read_dcp(path: Path, cfg: JambaConfig) -> Dict[str, torch.Tensor]:
    # Lazy import: jamba/ does not use torch.distributed; reading a DCP checkpoint on one process does
    # not need a process group (no_dist=True), only DCP's file reader.
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    prefix = _strip_prefix(meta.keys())
    _check_expert_biases(path, (k[len(prefix):] for k in meta if k.startswith(prefix)), cfg)
    model = build_model(cfg, empty=True)
    want = {}
    for k, t in model.state_dict().items():
        full = prefix + k
        if full not in meta:
            if k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise KeyError(f"{path}: DCP checkpoint has no tensor {full!r} (config does not match?)")
        md = meta[full]
        want[full] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load(want, storage_reader=reader, no_dist=True)
    return {full[len(prefix):]: t for full, t in want.items()}


def write_our_checkpoint(tensors: Iterable[Tuple[str, torch.Tensor]], cfg: JambaConfig, out_dir,
                         max_shard_size="5GB", dtype: Optional[torch.dtype] = None) -> None:
    """Our checkpoint as a directory: jamba_config.json + model.safetensors (or shards + index)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = cfg.tie_word_embeddings
    items = ((k, t) for k, t in tensors if not (tied and k == "lm_head.weight"))
    save_safetensors(items, out_dir, max_shard_size=max_shard_size, dtype=dtype)
    (out_dir / OUR_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_checkpoint(path, cfg=None, *, dtype: Optional[torch.dtype] = None, device="cpu"):
    """Our JambaForCausalLM (eval mode) from any checkpoint `read_our_checkpoint` reads; the config comes
    from `cfg` (see load_our_config) or is looked for next to the checkpoint."""
    path = Path(path)
    cfg = _resolve_config(path, cfg)
    model = build_model(cfg, empty=True)
    return _materialise(model, read_our_checkpoint(path, cfg), dtype, device).eval()


def _resolve_config(path: Path, cfg) -> JambaConfig:
    if cfg is not None:
        return load_our_config(cfg)
    found = _find_config_near(path)
    if found is None:
        raise ConfigError(f"no model config found for {path}: pass --config (a JSON/YAML file of the model "
                          f"fields, the run's Hydra config, or a preset name)")
    log.info("model config from %s", found)
    return load_our_config(found)


# ================================================================================================
# Export / import
# ================================================================================================

def export_hf(checkpoint, out_dir, config=None, *, dtype: Optional[torch.dtype] = None,
              max_shard_size="5GB", tokenizer=None, use_mamba_kernels: bool = True, layout: str = "5.x",
              **hf_overrides) -> Path:
    """Write an HF Jamba directory (config.json, safetensors, jamba_config.json, optionally the tokenizer)
    from one of our checkpoints (see read_our_checkpoint) or an in-memory model of ours. layout="5.x"
    stacks the experts (transformers >= 5); "4.x" writes per-expert tensors (transformers 4.x and 5.x)."""
    if layout not in ("5.x", "4.x"):
        raise ValueError(f"layout={layout!r}: choose '5.x' (stacked experts) or '4.x' (per-expert tensors)")
    # Everything that can refuse (shard size, tokenizer, config, checkpoint) runs before out_dir is made, so
    # a refusal leaves nothing behind; the cheap checks first, before a (DCP: whole) checkpoint is read.
    _parse_size(max_shard_size)
    out_dir = Path(out_dir)
    cfg = _model_config(checkpoint) if hasattr(checkpoint, "state_dict") else _resolve_config(Path(checkpoint), config)
    tok = _load_tokenizer(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    for k, v in (_special_token_ids(tok) if tok is not None else {}).items():
        hf_overrides.setdefault(k, v)
    hf_overrides.setdefault("pad_token_id", None)
    hf_cfg = config_to_hf(cfg, use_mamba_kernels=use_mamba_kernels, **hf_overrides)
    if hasattr(checkpoint, "state_dict"):
        sd = checkpoint.state_dict()
        keys, get = list(sd), sd.__getitem__
    else:
        keys, get = open_our_checkpoint(checkpoint, cfg)  # lazy: one tensor (group) at a time
    plan = plan_to_hf(keys, cfg)
    expected = set(hf_expected_keys(hf_cfg))
    produced = {t for t, _, _ in plan}
    if expected != produced:
        raise KeyError(f"converted keys do not match transformers' model: missing {sorted(expected - produced)[:8]}, "
                       f"unexpected {sorted(produced - expected)[:8]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    first = get(keys[0])
    out_dtype = dtype or first.dtype
    hf_cfg.dtype = str(out_dtype).replace("torch.", "")
    items = run_plan(plan, get)
    save_safetensors(split_experts_4x(items) if layout == "4.x" else items, out_dir,
                     max_shard_size=max_shard_size, dtype=dtype)
    if tok is not None:
        _save_tokenizer(tok, Path(tokenizer), out_dir)
    hf_cfg.save_pretrained(str(out_dir))
    (out_dir / OUR_CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log.info("exported %d tensors to %s", len(plan), out_dir)
    return out_dir


def _export_tokenizer(tokenizer, out_dir: Path, vocab_size: int) -> dict:
    """Save a sentencepiece model (or an HF tokenizer directory) as an HF tokenizer in out_dir
    (Llama-style: tokenizer.model + tokenizer.json, no BOS/EOS added); returns its special token ids."""
    tok = _load_tokenizer(tokenizer, vocab_size)
    _save_tokenizer(tok, Path(tokenizer), Path(out_dir))
    return _special_token_ids(tok)


def _load_tokenizer(tokenizer, vocab_size: int):
    """transformers' tokenizer for a sentencepiece model or an HF tokenizer directory, checked against the
    model's vocab_size; writes nothing (export checks it before making its output directory)."""
    import tempfile

    import transformers

    path = Path(tokenizer)
    fix = ("give the run's sentencepiece model (e.g. runs/NAME/tokenizer.model) or an HF tokenizer folder, or "
           "export without --tokenizer")
    if not path.exists():
        raise ConfigError(f"--tokenizer {str(path)!r}: no such file or folder; {fix}")
    if path.is_dir():  # already an HF tokenizer directory
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ConfigError(f"--tokenizer {str(path)!r} is not an HF tokenizer folder ({_one_line(err)}); "
                              f"{fix}") from err
    else:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:  # sentencepiece reports a bad file as RuntimeError
            raise ConfigError(f"--tokenizer {str(path)!r} is not a sentencepiece model ({_one_line(err)}); "
                              f"{fix}") from err
        tc = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False}
        for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                        ("pad_token", sp.pad_id())):
            tc[name] = sp.id_to_piece(i) if i >= 0 else None
        # add_prefix_space must mirror the model's add_dummy_prefix (data/ trains without it).
        try:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(path.read_bytes())
            tc["add_prefix_space"] = bool(proto.normalizer_spec.add_dummy_prefix)
        except Exception:  # noqa: BLE001 - protobuf missing: infer from an encoding
            tc["add_prefix_space"] = sp.encode("a", out_type=str)[:1] != ["a"]
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(path, Path(tmp) / "tokenizer.model")
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tc))
            tok = transformers.AutoTokenizer.from_pretrained(tmp)
        sample = "".join(sp.id_to_piece(i) for i in range(min(sp.get_piece_size(), 300))
                         if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))).replace("\u2581", " ")
        if tok.encode(sample, add_special_tokens=False) != sp.encode(sample):
            log.warning("the HF tokenizer built from %s does not encode like sentencepiece on a sample", path)
    if len(tok) > vocab_size:
        raise ConfigError(f"tokenizer {path} has {len(tok)} tokens but model.vocab_size={vocab_size}")
    return tok


def _save_tokenizer(tok, path: Path, out_dir: Path) -> None:
    """Write `tok` (from `_load_tokenizer(path)`) into out_dir, with the sentencepiece model when it is one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        shutil.copy(path, out_dir / "tokenizer.model")
    tok.save_pretrained(str(out_dir))


def _special_token_ids(tok) -> dict:
    return {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(tok, k, None) is not None}


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (the command line prints one line per error)."""
    return " ".join(str(err).split())


def import_hf(hf_dir, out_dir, *, dtype: Optional[torch.dtype] = None, max_shard_size="5GB") -> JambaConfig:
    """Convert an HF Jamba directory (5.x or 4.x expert layout) to our checkpoint directory
    (jamba_config.json + safetensors), tensor by tensor (memory: one output shard + one tensor group)."""
    _parse_size(max_shard_size)  # before anything is written
    hf_dir = _check_hf_dir(hf_dir)
    base = load_our_config(hf_dir / OUR_CONFIG_NAME) if (hf_dir / OUR_CONFIG_NAME).exists() else None
    cfg = config_from_hf(hf_dir / "config.json", base=base)
    src = SafetensorsSource(hf_dir)
    write_our_checkpoint(run_plan(plan_from_hf(src.keys(), cfg), src.get), cfg, out_dir,
                         max_shard_size=max_shard_size, dtype=dtype)
    src.close()
    return cfg


def _check_hf_dir(hf_dir) -> Path:
    """`hf_dir` as a Path if it is a folder with a config.json, else ConfigError saying what to give instead.
    Only local files are read: a hub id (README's ai21labs/Jamba-v0.1) is not downloaded, since training
    machines often have no network; and one of our own checkpoints converts the other way, with `export`."""
    path = Path(hf_dir)
    what = "an HF checkpoint is read from a local folder (config.json + *.safetensors)"
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if (path / ".metadata").exists() or (path / "checkpoints").is_dir() or (path / OUR_CONFIG_NAME).exists():
        raise ConfigError(f"{str(path)!r} is one of our own checkpoints (or a run directory), not an HF one; "
                          f"to convert it to HF use `python -m jamba.hf export {path} OUT_DIR`")
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} has no config.json, so it is not an HF checkpoint folder: {what}")
    if path.exists():
        raise ConfigError(f"{str(path)!r} is a file: {what}; give the folder that holds it")
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(hf_dir)):  # not shaped like a hub id (OWNER/NAME)
        raise ConfigError(f"{str(path)!r}: no such folder; {what}")
    raise ConfigError(f"{str(path)!r} is not a local folder: {what}, a hub id is not downloaded; on a machine with "
                      f"network run `hf download {hf_dir} --local-dir DIR` (older huggingface_hub: "
                      f"`huggingface-cli download`), then pass DIR in its place")


PROG = "python -m jamba.hf"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="our checkpoint -> HF Jamba directory (from_pretrained-able)")
    e.add_argument("checkpoint", help="DCP dir, our safetensors dir, or a .pt/.safetensors state-dict file")
    e.add_argument("out_dir")
    e.add_argument("--config", help="model config: JSON/YAML file (fields or a Hydra config with model:) or preset")
    e.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    e.add_argument("--tokenizer", help="sentencepiece .model (or an HF tokenizer dir) to save beside the weights")
    e.add_argument("--max-shard-size", default="5GB")
    e.add_argument("--no-mamba-kernels", action="store_true", help="write use_mamba_kernels=false")
    e.add_argument("--hf-layout", choices=["5.x", "4.x"], default="5.x",
                   help="expert tensors stacked (transformers>=5, default) or per expert (also loads in 4.x)")
    i = sub.add_parser("import", help="HF Jamba directory -> our checkpoint (jamba_config.json + safetensors)")
    i.add_argument("hf_dir", help="local folder of an HF Jamba checkpoint (config.json + safetensors; a hub id is "
                                  "not downloaded: `hf download ID --local-dir DIR` first)")
    i.add_argument("out")
    i.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    i.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.cmd == "export":
            out = export_hf(args.checkpoint, args.out_dir, args.config, dtype=dtype,
                            max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                            use_mamba_kernels=not args.no_mamba_kernels, layout=args.hf_layout)
            print(f"wrote {out} (load with transformers.JambaForCausalLM.from_pretrained({str(out)!r}))")
        else:
            cfg = import_hf(args.hf_dir, args.out, dtype=dtype, max_shard_size=args.max_shard_size)
            print(f"wrote {args.out} ({cfg.num_hidden_layers} layers, layout {cfg.layer_pattern_string()})")
    except (ConfigError, KeyError, FileNotFoundError) as err:  # a user's input: one line, not a traceback
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
