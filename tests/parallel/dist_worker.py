"""Multi-process worker of tests/parallel/test_parallel_layouts.py (run under torchrun; gloo on CPU, NCCL on GPU).

For each layout named on the command line: build the tiny model from the same seed, parallelize it,
train 3 AdamW steps on the same global batch (each data-parallel rank takes its slice) and record
the global loss per step, the full gradients after the first backward and the full parameters at the
end. With `reshard=<dir>`, also save a DCP checkpoint after 2 steps in the first layout and resume
step 3 from it in the other layouts. Rank 0 writes everything to out=<file> (torch.save).

On CPU everything runs in float64 (`dtype=float32` on the command line for fp32): the comparison then
measures the layout, not the CPU's fp32 kernels (AVX2 and AVX512 sum in different orders, and AdamW's
normalised update turns a 1e-7 gradient difference into a 1e-5 parameter difference for near-zero
gradients). On GPU the parameters are fp32 (TF32 off) or bf16, as the layout's param_dtype says.

Usage: torchrun --nproc_per_node N tests/parallel/dist_worker.py out=<file> layouts=a,b [reshard=<dir>]
       [syncs=a,b]  (CUDA: the host syncs of one forward + backward of each layout, by Python line)
Layout syntax: "dp_shard=2+ep=2" (keys of ParallelConfig joined by "+"; "kv=1" overrides the model's
num_key_value_heads, to exercise replicated kv heads under TP; "compile=aot_eager" applies
parallel.compile.apply_compile with that backend after the layout; "fault=1e-6" is a deliberately broken
layout: data-parallel rank 0 scales its loss by 1 + 1e-6, which the tests must detect).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from jamba.config import get_preset
from jamba.model import JambaForCausalLM
from parallel import ParallelConfig, ParallelDims, parallelize

SEED, STEPS, LR = 1234, 3, 1e-3
DEVICE = torch.device("cpu")  # device=cuda on the command line: NCCL, one GPU per rank
DTYPE = torch.float64  # of the model on CPU (dtype=float32 on the command line); on GPU: float32
MODEL_OVERRIDES = dict(loss_chunk_size=24, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)


def model_config(**overrides):
    return get_preset("tiny", **{**MODEL_OVERRIDES, **overrides})


def global_batch(step: int, batch: int = 4, seq_len: int = 16, vocab: int = 2048):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=True)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def record(t):
    """A full, CPU copy for comparison: bf16 widened to fp32, fp64 kept."""
    t = full(t).detach()
    return t.to(torch.promote_types(t.dtype, torch.float32)).cpu().clone()


def new_model(cfg, starve: bool = False, only_experts: bool = False):
    torch.manual_seed(SEED)
    model = JambaForCausalLM(cfg).to(DEVICE, DTYPE)
    if only_experts:  # everything but the experts frozen: the rows reaching the experts need no gradient
        for name, p in model.named_parameters():
            p.requires_grad_(".experts." in name)
    if starve:  # every token picks its top-k among the first half of the experts: EP's last rank gets no rows
        for layer in model.model.layers:
            bias = getattr(layer.feed_forward, "expert_bias", None)
            if bias is not None:
                half = bias.shape[0] // 2
                bias.copy_(torch.cat([bias.new_ones(half), -bias.new_ones(bias.shape[0] - half)]))
    return model


def parse_layout(spec: str):
    """"tp=2+ep=2" -> (ParallelConfig, model overrides); "kv=1" sets model.num_key_value_heads, "ac=moe" (kinds
    joined by "/") model.activation_checkpointing."""
    kw, model = {}, {}
    for item in spec.split("+"):
        k, v = item.split("=")
        if k == "kv":
            model["num_key_value_heads"] = int(v)
        elif k == "ac":  # model.activation_checkpointing, kinds joined by "/" (recomputation: same numbers)
            model["activation_checkpointing"] = v.split("/")
        elif k == "compile":  # parallel.compile.apply_compile with this backend, after the layout
            model["_compile"] = v
        elif k == "starve":  # fixed expert biases that route every token to the first half of the experts
            model["moe_router_bias_update_rate"] = 0.01  # (registers the biases; nothing here updates them)
            model["_starve"] = True
        elif k == "train":  # train=experts: only the experts' weights are trained
            model["_only_experts"] = v == "experts"
        elif k == "fault":  # deliberately broken: rank 0 of the data-parallel group scales its loss
            model["_fault"] = float(v)
        else:
            kw[k] = (v == "true") if v in ("true", "false") else int(v) if v.lstrip("-").isdigit() else v
    kw.setdefault("dp_shard", -1)
    return ParallelConfig(**kw), model


def build(spec: str):
    pcfg, overrides = parse_layout(spec)
    backend = overrides.pop("_compile", None)
    fault = overrides.pop("_fault", 0.0)
    starve = overrides.pop("_starve", False)
    only_experts = overrides.pop("_only_experts", False)
    cfg = model_config(**overrides)
    dims = ParallelDims(pcfg, world_size=dist.get_world_size(), model=cfg, seq_len=16)
    dims.build_mesh(DEVICE.type)
    model = parallelize(new_model(cfg, starve, only_experts), dims)
    model.fault = fault
    if backend:
        from parallel.compile import apply_compile

        apply_compile(model, backend=backend)
    return model, dims


def local_batch(dims, i: int):
    """This data-parallel rank's slice of step i's global batch, on DEVICE: (ids, aligned targets)."""
    ids, targets = global_batch(i)
    per = ids.shape[0] // dims.dp_size
    sl = slice(dims.dp_rank * per, (dims.dp_rank + 1) * per)
    return ids[sl].to(DEVICE), targets[sl].to(DEVICE)


def step(model, dims, opt, i: int):
    ids, targets = local_batch(dims, i)
    out = model(ids, targets=targets)  # aligned (the trainer's convention)
    fault = getattr(model, "fault", 0.0) if dims.dp_rank == 0 else 0.0
    (out.loss * (1 + fault) if fault else out.loss).backward()
    loss = out.loss.detach().clone()
    if dims.dp_size > 1:  # mean over the data-parallel ranks (TP ranks hold the same loss)
        dist.all_reduce(loss, group=dims.get_mesh("dp").get_group())
        loss /= dims.dp_size
    return loss.item(), out


EXCHANGES = {"sized": 0, "padded": 0, "overlap": 0}  # EP exchanges run, by kind (which one a layout really used)
OVERLAP_GROUPS = set()  # names of the process groups the overlapped exchanges ran on


def _count_exchanges() -> None:
    import parallel.expert_parallel as epm

    for kind, name in (("sized", "_exchange"), ("padded", "_exchange_padded"), ("overlap", "overlapped_experts")):
        def counted(*a, _fn=getattr(epm, name), _kind=kind, **k):
            EXCHANGES[_kind] += 1
            if _kind == "overlap":  # overlapped_experts(fwd, x, counts, group, ep, sms)
                OVERLAP_GROUPS.add(a[3].group_name)
            return _fn(*a, **k)
        setattr(epm, name, counted)


def run_layout(spec: str, result: dict) -> None:
    EXCHANGES.update(sized=0, padded=0, overlap=0)
    OVERLAP_GROUPS.clear()
    model, dims = build(spec)
    opt = make_optimizer(model)
    losses, grads = [], None
    for i in range(STEPS):
        loss, out = step(model, dims, opt, i)
        losses.append(loss)
        if i == 0:
            grads = {n: record(p.grad) for n, p in model.named_parameters() if p.requires_grad}
            counts = out.expert_counts.clone()
        opt.step()
        opt.zero_grad()
    params = {n: record(p) for n, p in model.named_parameters()}
    counts = counts.cpu()
    from torch.distributed.fsdp import FSDPModule

    units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]  # "" is the root
    result[spec] = dict(losses=losses, grads=grads, params=params, expert_counts=counts, dims=str(dims),
                        exchanges=dict(EXCHANGES), fsdp_units=units,
                        # whether the overlap ran on the EP mesh's own group (parallel.ep_overlap_sms=0) or another
                        overlap_on_mesh_group=sorted(g == dims.get_mesh("ep").get_group().group_name
                                                     for g in OVERLAP_GROUPS) if dims.ep > 1 else [])


def run_reshard(specs, ckpt_dir: str, result: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, dims = build(specs[0])
    opt = make_optimizer(model)
    for i in range(2):
        step(model, dims, opt, i)
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    dist.barrier()
    for spec in specs[1:]:
        model, dims = build(spec)
        opt = make_optimizer(model)
        msd, osd = get_state_dict(model, opt)  # empty optimizer state is fine: DCP fills it in
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loss, _ = step(model, dims, opt, 2)
        opt.step()
        params = {n: record(p) for n, p in model.named_parameters()}
        result[f"reshard:{specs[0]}->{spec}"] = dict(loss=loss, params=params)


def count_syncs(spec: str, result: dict) -> None:
    """CUDA: where the host waited for the GPU in one forward + backward of the layout (after a first one),
    as `torch.cuda.set_sync_debug_mode("warn")` reports them: "file:line" of each synchronising call."""
    from trainer.profile import host_syncs

    model, dims = build(spec)
    opt = make_optimizer(model)
    step(model, dims, opt, 0)  # first step: one-time work (handles, caches)
    opt.zero_grad()
    ids, targets = local_batch(dims, 1)
    torch.cuda.synchronize()
    with host_syncs() as syncs:
        model(ids, targets=targets).loss.backward()
    result[f"syncs:{spec}"] = syncs


def reference(model_overrides: dict) -> dict:
    """The single-process run on the whole global batch (what every layout must reproduce)."""
    overrides = dict(model_overrides)
    starve = overrides.pop("_starve", False)
    only_experts = overrides.pop("_only_experts", False)
    model = new_model(model_config(**overrides), starve, only_experts)
    opt = make_optimizer(model)
    losses = []
    for i in range(STEPS):
        ids, targets = global_batch(i)
        out = model(ids.to(DEVICE), targets=targets.to(DEVICE))
        out.loss.backward()
        losses.append(out.loss.item())
        if i == 0:
            grads = {n: record(p.grad) for n, p in model.named_parameters() if p.requires_grad}
            counts = out.expert_counts.cpu()
        opt.step()
        opt.zero_grad()
    params = {n: record(p) for n, p in model.named_parameters()}
    return dict(losses=losses, grads=grads, params=params, expert_counts=counts)


def check_init(spec: str, result: dict) -> None:
    """parallel.init_weights on a meta-built, parallelised model: "full" gives exactly the single-process
    init; "local" leaves every replicated mesh dimension consistent (checked by gathering the shards)."""
    from torch.distributed.tensor import DTensor, Replicate

    from parallel import init_weights

    pcfg, overrides = parse_layout(spec)
    cfg = model_config(**overrides)
    out = {}
    for mode in ("full", "local"):
        dims = ParallelDims(pcfg, world_size=dist.get_world_size(), model=cfg, seq_len=16)
        dims.build_mesh(DEVICE.type)
        with torch.device("meta"):
            model = JambaForCausalLM(cfg)
        parallelize(model, dims)
        model.to_empty(device=DEVICE)
        init_weights(model, seed=SEED, mode=mode)
        inconsistent = []
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor):
                continue
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Replicate) and p.device_mesh.size(dim) > 1:
                    local = p.to_local().contiguous()
                    parts = [torch.empty_like(local) for _ in range(p.device_mesh.size(dim))]
                    dist.all_gather(parts, local, group=p.device_mesh.get_group(dim))
                    if any(not torch.equal(parts[0], q) for q in parts[1:]):
                        inconsistent.append(name)
        out[mode] = dict(params={n: record(p) for n, p in model.named_parameters()},
                         inconsistent=inconsistent)
    result[f"init:{spec}"] = out


def main() -> None:
    from torchrun_worker import finish_worker, init_worker

    global DEVICE, DTYPE
    args, DEVICE = init_worker(sys.argv[1:])
    # on CUDA the layout's param_dtype decides what the GPU computes in
    DTYPE = torch.float32 if DEVICE.type == "cuda" else getattr(torch, args.get("dtype", "float64"))
    result = {}
    _count_exchanges()
    if DEVICE.type == "cuda" and dist.get_rank() == 0:  # the reference on the same kind of device
        result["ref"] = reference({})
    for spec in filter(None, args.get("layouts", "").split(",")):
        run_layout(spec, result)
    for spec in filter(None, args.get("init", "").split(",")):
        check_init(spec, result)
    for spec in filter(None, args.get("syncs", "").split(",")):
        count_syncs(spec, result)
    if "reshard" in args:
        run_reshard(args["reshard_layouts"].split(","), args["reshard"], result)
    finish_worker(result, args["out"])


if __name__ == "__main__":
    from trainer.distributed import exit_now

    main()
    exit_now(0)  # results written: skip the finalization where gloo occasionally aborts (exit_process says why)
