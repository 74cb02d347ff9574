"""Tensor parallelism plans (DTensor) for the Jamba model, keyed by module name.

Every layer's input and output stay plain replicated tensors (`use_local_output=True`), so layers
of different kinds compose without a `tp` branch in the model:

    model.embed_tokens        vocab-parallel embedding (RowwiseParallel on nn.Embedding: masked lookup + all-reduce)
    lm_head                   vocab-parallel weight; the loss is the vocab-parallel chunked CE (parallel/loss.py)
    self_attn.{q,k,v}_proj    column-wise = by heads; with tp > kv heads, k/v_proj are replicated and each
                              rank uses the rows of its kv head (their gradient is summed over the TP group)
    self_attn.o_proj          row-wise (all-reduce)
    mamba.in_proj             column-wise: rows are interleaved [x_c, z_c] per channel, so a contiguous row
                              shard holds matching channels of x and z
    mamba.conv1d, dt_proj,    sharded on channels (dim 0); the forward sees local shards (LocalParams)
      A_log, D
    mamba.x_proj              row-wise: its input is sharded on d_inner, the output [dt, B, C] is all-reduced
    mamba.{dt,b,c}_layernorm  replicated; their outputs feed channel-sharded consumers (dt_proj, the scan),
                              so the gradient of their outputs is all-reduced (SumGradOutput)
    mamba.out_proj            row-wise (all-reduce)
    feed_forward (MLP)        gate/up column-wise, down row-wise (by intermediate size)
    feed_forward.experts      by intermediate size (and experts over ep): parallel/expert_parallel.py
    norms, router             replicated (identical computation on every TP rank)

With `parallel.sequence_parallel`, the residual stream between the blocks is sharded on the sequence
instead (parallel/sequence_parallel.py); the plans above change only at the block boundaries.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from parallel.collectives import copy_to_group
from parallel.dims import ParallelDims
from parallel.styles import LocalParams


def _kv_replicated_style(tp_mesh, tp: int, num_kv: int, head_dim: int) -> LocalParams:
    """k/v_proj when tp > num_kv (tp a multiple of it): weights stay replicated (global shape);
    rank r uses the rows of kv head r * num_kv // tp, i.e. the one its query heads attend to."""
    group, rank = tp_mesh.get_group(), tp_mesh.get_local_rank()
    head = rank * num_kv // tp
    rows = slice(head * head_dim, (head + 1) * head_dim)

    def local_fn(path, w):  # w: (num_kv * head_dim, H) replicated
        # identity forward; backward sums the row-gradients of all TP ranks into the replicated weight
        return copy_to_group(w, group)[rows]

    def input_fn(x):
        # the input's gradient from this rank's heads is a partial sum: all-reduce it (as ColwiseParallel
        # does); under sequence parallelism the input is a Replicate DTensor whose gather reduces it
        if isinstance(x, DTensor):
            return x.to_local(grad_placements=[Partial()])
        return copy_to_group(x, group)

    style = LocalParams({"weight": [Replicate()]}, local_fn=local_fn)
    style.input_fn = input_fn
    return style


class SumGradOutput(ParallelStyle):
    """For a replicated module whose output feeds TP-sharded consumers: identity forward, the output's
    gradient (a partial sum on each rank) is all-reduced in backward (Megatron's "f" operator)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        group = device_mesh.get_group()
        module.register_forward_hook(lambda mod, args, out: copy_to_group(out, group))
        return module


def mamba_plan(mixer: nn.Module, sp: bool = False) -> dict:
    channel = [Shard(0)]
    local = {"A_log": channel, "D": channel, "conv1d.weight": channel, "dt_proj.weight": channel}
    for owner, name in ((mixer.conv1d, "conv1d.bias"), (mixer.dt_proj, "dt_proj.bias")):
        if owner.bias is not None:
            local[name] = channel
    return {
        "in_proj": ColwiseParallel(),
        "x_proj": RowwiseParallel(input_layouts=Shard(-1)),
        "dt_layernorm": SumGradOutput(),
        "b_layernorm": SumGradOutput(),
        "c_layernorm": SumGradOutput(),
        "out_proj": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate()),
        "": LocalParams(local),
    }


def attention_plan(attn: nn.Module, tp_mesh, tp: int, sp: bool = False) -> dict:
    num_kv = attn.k_proj.out_features // attn.head_dim
    plan = {"q_proj": ColwiseParallel(), "o_proj": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())}
    if tp <= num_kv:
        plan.update(k_proj=ColwiseParallel(), v_proj=ColwiseParallel())
    else:
        for name in ("k_proj", "v_proj"):
            plan[name] = _kv_replicated_style(tp_mesh, tp, num_kv, attn.head_dim)
    return plan


def mlp_plan(sp: bool = False) -> dict:
    return {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
            "down_proj": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())}


def apply_tp(model: nn.Module, dims: ParallelDims) -> None:
    """Tensor-parallelise embedding, lm_head, attention, Mamba-1 and dense MLPs over the "tp" mesh
    (experts are handled by `parallel.expert_parallel.apply_experts`)."""
    tp_mesh, sp = dims.get_mesh("tp"), dims.cfg.sequence_parallel
    parallelize_module(model.model.embed_tokens, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()))
    from parallel.loss import apply_vocab_parallel_loss
    apply_vocab_parallel_loss(model, dims)
    if sp:
        from parallel.sequence_parallel import GatherSeqInput, ScaleInputGrad, ScatterSeqOutput, SumWeightGrad
        parallelize_module(model.model.final_layernorm, tp_mesh, SumWeightGrad())
    for layer in model.model.layers:
        ffn = layer.feed_forward
        moe = hasattr(ffn, "experts")
        if sp:
            for norm in (layer.input_layernorm, layer.pre_ff_layernorm):
                parallelize_module(norm, tp_mesh, SumWeightGrad())
            parallelize_module(layer.mixer, tp_mesh, GatherSeqInput(as_dtensor=True))
            if moe:  # plain gathered input (router + experts); see parallel/sequence_parallel.py
                parallelize_module(ffn, tp_mesh, GatherSeqInput(as_dtensor=False))
                parallelize_module(ffn, tp_mesh, ScatterSeqOutput())
                parallelize_module(ffn.router, tp_mesh, ScaleInputGrad(1.0 / dims.tp))
            else:
                parallelize_module(ffn, tp_mesh, GatherSeqInput(as_dtensor=True))
        if hasattr(layer, "mamba"):
            apply_plan(layer.mamba, tp_mesh, mamba_plan(layer.mamba, sp))
        if hasattr(layer, "self_attn"):
            apply_plan(layer.self_attn, tp_mesh, attention_plan(layer.self_attn, tp_mesh, dims.tp, sp))
        if not moe:
            apply_plan(ffn, tp_mesh, mlp_plan(sp))


def apply_plan(module: nn.Module, mesh, plan: dict) -> None:
    """parallelize_module with a plan keyed by submodule name, where "" is the module itself."""
    plan = dict(plan)
    own = plan.pop("", None)
    if plan:
        parallelize_module(module, mesh, plan)
    if own is not None:
        parallelize_module(module, mesh, own)
