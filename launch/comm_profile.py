"""Share of a training step's GPU time in NCCL kernels, for one parallel layout (run under torchrun).

    torchrun --standalone --nproc_per_node 2 -m launch.comm_profile --out comm.json -- model=bench-3b parallel=tp \
        train.device=cuda 'curriculum.stages=[{seq_len: 4096, micro_batch_size: 4}]' train.global_batch_tokens=16384

The model, layout, precision and compilation come from the same Hydra overrides as train.py, built by the same
functions (trainer.build.Layout, parallel.compile, trainer.optim), and each rank trains on random token ids of the
first curriculum stage's shape (forward with labels, backward, AdamW step, the expert-bias update: what a train.py
step does without its data loader, logging and gradient accumulation). After `--warmup` steps, `--steps` steps run
under torch.profiler; rank 0 writes per-step wall time, total kernel time, NCCL kernel time by collective
(AllReduce, ReduceScatter, AllGather, SendRecv = all-to-all, ...) and their share of the wall time. NCCL kernels
run on their own streams and may overlap computation (FSDP prefetches its all-gathers); tensor parallelism's
all-reduces sit between the layers' matmuls, so for TP the share is close to the time they cost. What they cost is
in `timeline_ms_per_step` (trainer.profile.timeline): the time under some compute kernel, the NCCL time under none
(`exposed_comm`: communication nothing hid) and the time under no kernel at all (`idle`: the device waiting on the
host), and `nccl_exposed_share_of_wall`. On several ranks, `sendrecv_ms_per_step` splits the all-to-alls' kernel
time (EP) into the exchange itself and each rank's wait for later peers (trainer.profile.pair_waits), and
`host_bound_idle` says how much of rank 0's idle time the device waited for the host to issue the next operation
(trainer.profile.host_bound_idle).
`launch/scale.py --comm-profile tp` runs this after the layout's throughput run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from trainer.profile import device_kernels, host_bound_idle, idle_gaps, nccl_kind, pair_waits, timeline

ROOT = Path(__file__).resolve().parents[1]


def summarize(kernels: Iterable[Tuple[str, float]], wall_ms: float, steps: int) -> dict:
    """kernels: (name, device time in ms) over `steps` profiled steps taking `wall_ms` in all."""
    by_kind: Dict[str, float] = defaultdict(float)
    total = 0.0
    for name, ms in kernels:
        total += ms
        kind = nccl_kind(name)
        if kind is not None:
            by_kind[kind] += ms
    nccl = sum(by_kind.values())
    return {"steps": steps, "wall_ms_per_step": wall_ms / steps, "kernel_ms_per_step": total / steps,
            "nccl_ms_per_step": nccl / steps,
            "nccl_ms_by_kind": {k: v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "nccl_share_of_wall": nccl / wall_ms if wall_ms else 0.0,
            "nccl_share_of_kernels": nccl / total if total else 0.0}


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_object(compose(config_name="config", overrides=list(overrides)))


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m launch.comm_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="train.py's Hydra overrides (after --)")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainer import build, distributed
    from trainer.loop import autocast_context
    from trainer.optim import build_optimizer

    cfg = _compose(args.overrides)
    world = distributed.world_from_env()
    stage = cfg.curriculum.stages[0]
    layout = build.Layout(cfg.parallel, world.world_size, cfg.model, stage.seq_len)
    device = distributed.resolve_device(cfg.train.device, world)
    distributed.init_distributed(world, device)
    try:
        build.seed_everything(cfg.train.seed)
        model = layout.build_model(cfg.model, device, cfg.train.seed, cfg.train.sharded_init)
        if cfg.train.compile if cfg.train.compile is not None else device.type == "cuda":
            from parallel.compile import apply_compile

            apply_compile(model)
        optimizer = build_optimizer(model, cfg.optim, device.type)
        gen = torch.Generator().manual_seed(cfg.train.seed + layout.dp_rank)  # tp ranks of a group: same batch
        ids = torch.randint(0, cfg.model.vocab_size, (stage.micro_batch_size, stage.seq_len + 1), generator=gen)
        ids = ids.to(device)

        update_biases = getattr(model, "update_expert_biases", None)  # model.moe_router_bias_update_rate

        def step():
            with autocast_context(device, cfg.train.precision):
                out = model(ids[:, :-1], labels=ids[:, 1:])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if update_biases is not None and out.expert_counts is not None:  # as train.py: routing as trained
                update_biases(out.expert_counts)

        for _ in range(args.warmup):
            step()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            wall_ms = 1e3 * (time.perf_counter() - t0)
        from torch.autograd import DeviceType

        kernels = [(e.key, e.self_device_time_total / 1e3) for e in prof.key_averages()
                   if getattr(e, "device_type", None) == DeviceType.CUDA]
        result = summarize(kernels, wall_ms, args.steps)
        if device.type == "cuda":
            spans = device_kernels(prof)
            tl = timeline(spans, wall_ms * 1e3)
            result["timeline_ms_per_step"] = {k.removesuffix("_us"): v / 1e3 / args.steps for k, v in tl.items()}
            result["nccl_exposed_share_of_wall"] = tl["exposed_comm_us"] / tl["wall_us"] if wall_ms else 0.0
            # where the idle time is: gaps grouped by the kernels around them (summed over the profiled steps)
            result["idle_gaps"] = idle_gaps(spans)
            dims = layout.dims
            # EP's all-to-alls: moving rows vs waiting for the other ranks. Paired over all ranks, so only where the
            # EP group is the whole world and no other collective runs as SendRecv (CP's all-to-alls and rings)
            if world.world_size > 1 and dims.ep == world.world_size and dims.cp == 1:
                import torch.distributed as dist

                mine = [(b - a) / 1e3 for name, a, b in sorted(spans, key=lambda k: k[1])
                        if nccl_kind(name) == "SendRecv"]
                every: List[List[float]] = [[] for _ in range(world.world_size)]
                dist.all_gather_object(every, mine)
                pw, per_step = pair_waits(every), (lambda ms: round(ms / args.steps, 3))
                result["sendrecv_ms_per_step"] = {
                    "count": pw["count"] / args.steps, "counts_by_rank": pw["counts_by_rank"],
                    "exchange": per_step(pw["exchange"]), "wait_by_rank": [per_step(w) for w in pw["wait_by_rank"]],
                    "total_by_rank": [per_step(t) for t in pw["total_by_rank"]]}
            if world.is_main:  # how much idle waited for the host (the trace's launch calls; rank 0 only, after
                # every collective of the profile, so no rank waits in one while rank 0 exports and parses its trace)
                result["host_bound_idle"] = _host_bound(prof, args.steps)
        result.update(world_size=world.world_size, layout=str(layout.dims), rank=world.rank)
        if world.is_main:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
            print(json.dumps(result), flush=True)
        return result
    finally:
        distributed.destroy_distributed()


def _host_bound(prof, steps: int) -> dict:
    """trainer.profile.host_bound_idle of the profiled steps, from their exported Chrome trace (the public way to
    the kernels' correlation with the host calls that launched them), in ms per step; the trace is deleted."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    h = host_bound_idle(events)
    for key in ("idle_us", "host_bound_us", "unattributed_us"):
        h[key.replace("_us", "_ms_per_step")] = round(h.pop(key) / 1e3 / steps, 3)
    for row in h["top"] + h["host_ops"]:
        row["ms_per_step"] = round(row.pop("us") / 1e3 / steps, 3)
    return h


if __name__ == "__main__":
    main()
