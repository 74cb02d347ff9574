"""AdamW with decay only on matrices, and learning-rate schedules as pure functions of the optimizer step.

The schedule has no state of its own: `lr_at(step)` depends only on the step (saved in every checkpoint),
so it continues across curriculum stages and resumes exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from trainer.config import OptimConfig

log = logging.getLogger(__name__)


def default_decay_filter(name: str, param: torch.Tensor) -> bool:
    """Weight decay on matrices only (ndim >= 2), never on norms, biases, A_log, D."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim >= 2 and leaf not in ("A_log", "D")


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with two parameter groups: decayed (where the model's `weight_decay_filter` says) and not."""
    decay_filter: Callable = getattr(type(model), "weight_decay_filter", None) or default_decay_filter
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decay_filter(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    kwargs.update({"fused": True} if fused else {"foreach": True})
    log.info("AdamW (%s): %d decayed tensors, %d without decay", "fused" if fused else "foreach",
             len(decay), len(no_decay))
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps.

    cosine:   linear warmup 0 -> lr over warmup_steps, then cosine from lr to min_lr at max_steps.
    wsd:      linear warmup, constant lr, then over the last decay_fraction of the run linear decay to min_lr.
    constant: linear warmup, then lr.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return peak + (floor - peak) * progress
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of cosine, wsd, constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
