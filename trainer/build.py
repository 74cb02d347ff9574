"""Builders used by train.py: the parallel layout, the model, the data loaders, the run directory.

Everything here is glue between the owners' APIs (jamba, parallel, data) and the step loop, kept out of
train.py so that train.py stays a readable page and tests can build the same pieces in-process.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from torch import nn

from jamba.config import ConfigError, JambaConfig
from trainer.config import RunConfig
from trainer.curriculum import Stage

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- parallel layout + model ----------------------------------------------------------------------
class Layout:
    """The parallel layout (PARALLEL's ParallelDims), validated at construction -- before any process group."""

    def __init__(self, parallel_cfg: Any, world_size: int, model_cfg: JambaConfig, seq_len: Any):
        """seq_len: every sequence length the run uses (the curriculum stages), or one; each is checked
        against the layout (e.g. divisible by parallel.cp)."""
        from parallel import ParallelConfig, ParallelDims

        if not isinstance(parallel_cfg, ParallelConfig):
            parallel_cfg = ParallelConfig(**dict(parallel_cfg))
        self.dims = ParallelDims(parallel_cfg, world_size, model=model_cfg, seq_len=seq_len)
        self.world_size = world_size

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank

    def build_model(self, model_cfg: JambaConfig, device: torch.device, seed: int,
                    sharded_init: Optional[bool] = None) -> nn.Module:
        """Build on the meta device (nothing allocated), then either

        - not sharded_init: materialise the whole model on `device`, run its init table (`init_weights(seed)`,
          same seed on every rank), then apply the parallel layout (TP/EP/FSDP2 shard the initialised
          tensors): every layout starts from exactly the weights of a single-process run;
        - sharded_init: apply the layout on meta, then `to_empty` + `init_weights` per shard (for models too
          large for one device; needs an init table that works on DTensors; parallel/init.py).
        None: `auto_sharded_init`."""
        from jamba.model import JambaForCausalLM

        with torch.device("meta"):
            model = JambaForCausalLM(model_cfg)
        if sharded_init is None:
            sharded_init = self.world_size > 1 and auto_sharded_init(model, device)
        if sharded_init:
            model = self._parallelize(model, device)
        model.to_empty(device=device)
        if sharded_init:  # DTensor parameters: the model's init rules through parallel.init_weights
            from parallel import init_weights

            init_weights(model, seed)
        else:
            model.init_weights(seed=seed)
        if not sharded_init:
            model = self._parallelize(model, device)
        return model

    def _parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.world_size == 1:
            return model
        from parallel import parallelize

        self.dims.build_mesh(device.type)
        model = parallelize(model, self.dims, device.type) or model
        log.info("parallel layout: %s", self.dims)
        return model


def auto_sharded_init(model: nn.Module, device: torch.device) -> bool:
    """train.sharded_init=null on several ranks: initialise after sharding when one fp32 copy of the model
    would take over a quarter of a GPU's memory (and over parallel.init's 8 GiB; on CPU: over 8 GiB), so a
    large model never materialises whole. Below that every rank initialises it whole: the exact
    single-process weights for every layout (sharded init keeps them only up to 8 GiB)."""
    from parallel.init import FULL_INIT_BYTES

    nbytes = 4 * sum(p.numel() for p in model.parameters())
    limit = FULL_INIT_BYTES
    if device.type == "cuda":
        limit = max(limit, torch.cuda.get_device_properties(device).total_memory // 4)
    if nbytes > limit:
        log.info("train.sharded_init=null: the fp32 model is %.1f GiB (over %.1f GiB), so it is initialised after "
                 "sharding, never whole on one device", nbytes / 2**30, limit / 2**30)
    return nbytes > limit


# ---- data ---------------------------------------------------------------------------------------
def build_data(cfg: RunConfig, run_dir: Path, dp_rank: int, dp_size: int, is_main: bool
               ) -> Tuple[Any, Callable, Optional[Callable]]:
    """Tokenizer (checked against the model, copied into the run directory) and loader factories:
    make_loader(stage, state) for training (this rank's shard), make_eval_loader(stage) for the held-out split."""
    import data

    tok = data.load_tokenizer(cfg.data)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer ({tok.path}) has {tok.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tok.vocab_size} or use a "
                          f"smaller tokenizer (data.tokenizer / data.vocab_size)")
    if is_main and tok.path and os.path.isfile(tok.path):
        shutil.copy2(tok.path, run_dir / "tokenizer.model")

    def make_loader(stage: Stage, state: Optional[dict]):
        loader = data.build_dataloader(cfg.data, tok, seq_len=stage.seq_len, micro_batch_size=stage.micro_batch_size,
                                       dp_rank=dp_rank, dp_world_size=dp_size, seed=cfg.train.seed)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def make_eval_loader(stage: Stage):
        return data.build_dataloader(cfg.data, tok, seq_len=stage.seq_len, micro_batch_size=stage.micro_batch_size,
                                     dp_rank=dp_rank, dp_world_size=dp_size, seed=cfg.train.seed,
                                     split="validation")

    return tok, make_loader, (make_eval_loader if cfg.train.eval_every else None)
