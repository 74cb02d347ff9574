"""`torch.compile` of the decoder layers (regional compilation), applied from outside the model.

Each decoder layer's computation (`DecoderLayer._forward`: norms, mixer, residuals, FFN or MoE routing) is
compiled on its own; the model's module tree, parameter names and hooks stay as they are, so FSDP2's
per-layer hooks, tensor/expert-parallel hooks, activation checkpointing (which wraps `_forward`) and
checkpoints work unchanged. Layers of the same kind (mixer x FFN) share one compiled graph. Our selective
scan is a `torch.library` op that Dynamo keeps in the graph; mamba-ssm's pybind kernel (its fallback) and
the in_proj's hand-written autograd are opaque, so the graph breaks around them. Inductor fuses the
element-wise work between the kernels (norms, residual adds, SwiGLU, MoE routing and weighting).

On one H100 (bench-3b, bf16, `python -m launch.bench --preset bench-3b --points 4096x4,16384x1 [--compile]`):
45,193 -> 48,474 tokens/s at 4K x 4 and 42,753 -> 45,860 at 16K x 1 (two consecutive runs on one machine);
docs/performance.md has the profile. CUDA graphs (`mode="reduce-overhead"`) were slower
(48,663 against 49,342 in one run): the step is GPU-bound, the GPU idles under 2% of it.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# Dynamo's per-code-object recompile budget: every layer kind (and, across curriculum stages, every
# sequence length until shapes are marked dynamic) takes one entry of DecoderLayer._forward's cache.
_MIN_RECOMPILE_LIMIT = 64


def _plain_hidden(fn):
    """Call `fn(hidden, ...)` with `hidden` as a plain tensor: a tensor-parallel embedding returns an
    AsyncCollectiveTensor (its all-reduce still in flight), and a compiled graph given one as input drops
    its gradient (the embedding's gradient came out zero; tests/parallel/test_compile.py). clone() waits
    for it and records an ordinary autograd node; only the first layer ever sees one."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    @functools.wraps(fn)
    def run(hidden, *args, **kwargs):
        if isinstance(hidden, AsyncCollectiveTensor):
            hidden = hidden.clone()
        return fn(hidden, *args, **kwargs)

    return run


def apply_compile(model: nn.Module, backend: str = "inductor", **compile_kwargs) -> nn.Module:
    """Compile every decoder layer's `_forward` in place (returns `model`). `backend` / `compile_kwargs`
    go to `torch.compile` (tests use backend="aot_eager" to check tracing without a C++ toolchain)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), _MIN_RECOMPILE_LIMIT))
    layers = list(model.model.layers)
    for layer in layers:
        if getattr(layer, "_jamba_compiled", False):
            raise ValueError("apply_compile: the model's layers are compiled already; call it once per model")
        layer._forward = _plain_hidden(torch.compile(layer._forward, backend=backend, **compile_kwargs))
        layer._jamba_compiled = True
    from jamba.loss import chunked_cross_entropy, softmax_xent_grad

    loss_fn = getattr(model, "loss_fn", None)
    wrapper = loss_fn if hasattr(loss_fn, "cp_inner") else None  # context parallelism's rescaling wrapper
    if (wrapper.cp_inner if wrapper else loss_fn) is chunked_cross_entropy:  # not vocab-parallel (TP)
        # the loss chunk's softmax / one-hot / mask / cast: two fused passes over the (chunk, vocab) logits
        compiled = functools.partial(chunked_cross_entropy, chunk_fn=torch.compile(
            softmax_xent_grad, backend=backend, dynamic=False, **compile_kwargs))
        if wrapper:
            wrapper.cp_inner = compiled
        else:
            model.loss_fn = compiled
    logger.info("torch.compile (%s): %d decoder layers, each on its own, and the loss chunks", backend, len(layers))
    return model
