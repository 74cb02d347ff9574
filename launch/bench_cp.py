"""Context-parallel training benchmark (torchrun): tokens/s, peak memory per GPU and the communication share
of a training step, for a model preset at one sequence length split over `--cp` ranks.

    torchrun --standalone --nproc_per_node 2 -m launch.bench_cp --cp 2 --seq 1048576 --ac all \\
        --set moe_token_chunk=65536 --profile --json cp2_1m.json          # bench-3b at 1M tokens on 2 GPUs
    torchrun --standalone --nproc_per_node 2 -m launch.bench_cp --cp 2 --seq 262144 --ac all --set moe_token_chunk=65536
    python -m launch.bench --points 131072x1@all --set moe_token_chunk=65536        # the cp=1 point at 128K
    torchrun --standalone --nproc_per_node 2 launch/bench_cp.py --device cpu --preset tiny --cp 2 --seq 64 --steps 2

Every rank builds the model from the same seed, applies the layout of `parallel/` (cp x FSDP over the
remaining ranks: fp32 weights and AdamW states, bf16 compute copies, fp32 reductions, as train.py does on CUDA;
on one rank nothing shards the fp32 states, 45 GiB for bench-3b), and trains `--warmup` untimed then `--steps`
timed steps (forward with loss, backward, AdamW) on one random batch of `--batch` rows per data-parallel rank;
the cp ranks of a row hold seq / cp tokens each. Reported (rank 0 prints, `--json` writes): tokens/s of the
whole job, tokens/s per GPU, the step time, every rank's peak allocated memory and, with `--profile`, one
more step under torch.profiler: device time of the NCCL kernels by collective
(all-to-all = SendRecv: context parallelism's exchanges; AllReduce: x_proj's sums and the loss / router
statistics; AllGather / ReduceScatter: FSDP) as a share of the step's wall time. Also the bytes each rank
sent through context parallelism's collectives per step (counted) next to the model's prediction
(`parallel.context_parallel.traffic_per_step`). NCCL kernels on FSDP's
streams can overlap compute, so their share is an upper bound on the step time they cost; the cp
exchanges run on the compute stream's critical path.

Longest sequence (one launch per length: an out-of-memory error on one rank would leave the other waiting
in a collective, so lengths are not tried in one process):

    for L in 786432 1048576 1310720 1572864; do
      torchrun --standalone --nproc_per_node 2 -m launch.bench_cp --cp 2 --seq $L --ac all \\
        --set moe_token_chunk=65536 --steps 1 --warmup 1 || break; done
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python launch/bench_cp.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from launch.bench import StepTimer, _override, parse_ac, peak_gib, reset_peak
from trainer.distributed import exit_process, init_process_group

log = logging.getLogger("launch.bench_cp")

COLLECTIVES = (("all_to_all (cp)", "SendRecv|AllToAll|alltoall"), ("all_reduce", "AllReduce|allreduce"),
               ("all_gather (fsdp)", "AllGather|allgather"), ("reduce_scatter (fsdp)", "ReduceScatter|reduce_scatter"))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun ... -m launch.bench_cp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-3b")
    p.add_argument("--set", dest="override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a JambaConfig field (JSON value), e.g. --set moe_token_chunk=65536")
    p.add_argument("--cp", type=int, default=2, help="context-parallel degree (default 2)")
    p.add_argument("--seq", type=int, default=1048576, help="tokens per sequence (default 1048576)")
    p.add_argument("--batch", type=int, default=1, help="rows per data-parallel rank (default 1)")
    p.add_argument("--ac", default="all", help="activation checkpointing: none, all, or kinds joined by '+'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (train.compile)")
    p.add_argument("--profile", action="store_true", help="one more step under torch.profiler: NCCL share")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result (rank 0) to this JSON file")
    return p.parse_args(argv)


def build(args, device: torch.device):
    from jamba.config import get_preset
    from jamba.model import JambaForCausalLM
    from parallel import ParallelConfig, ParallelDims, parallelize

    overrides = dict(args.override)
    overrides["activation_checkpointing"] = list(parse_ac(args.ac))
    cfg = get_preset(args.preset, **overrides)
    dims = ParallelDims(ParallelConfig(cp=args.cp, dp_shard=-1), world_size=dist.get_world_size(), model=cfg,
                        seq_len=args.seq)
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=args.seed)
    model = parallelize(model, dims, device.type)
    if args.compile:
        from parallel.compile import apply_compile

        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    return cfg, dims, model, opt


def nccl_share(prof, wall_s: float, device: torch.device) -> dict:
    """Device time of the NCCL kernels by collective, in ms and as a share of the profiled step's wall time
    (on CPU: the host time of the gloo collectives, c10d operators, which block the step)."""
    import re

    from torch.autograd import DeviceType

    out = {name: 0.0 for name, _ in COLLECTIVES}
    for e in prof.key_averages():
        if device.type == "cuda":
            if getattr(e, "device_type", None) != DeviceType.CUDA or "nccl" not in e.key.lower():
                continue
            us = float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        else:
            if not e.key.startswith("c10d::"):
                continue
            us = float(e.cpu_time_total)
        for name, pat in COLLECTIVES:
            if re.search(pat, e.key):
                out[name] += us / 1e3
                break
    total = sum(out.values())
    return {"wall_ms": wall_s * 1e3, "nccl_ms": out, "nccl_total_ms": total,
            "nccl_share": total / (wall_s * 1e3) if wall_s else None}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        cfg, dims, model, opt = build(args, device)
        gen = torch.Generator().manual_seed(1234 + dims.dp_rank)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        ids, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)  # whole rows: the model keeps its cp slice
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

        def step():
            with amp if amp is not None else contextlib.nullcontext():
                loss = model(ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        losses = []
        for _ in range(args.warmup):
            losses.append(step())
        reset_peak(device)
        from parallel import context_parallel

        sent0 = dict(context_parallel.TRAFFIC)
        timer = StepTimer(device)
        timer.mark()
        for _ in range(args.steps):
            losses.append(step())
            timer.mark()
        secs = timer.step_seconds()
        sent = {k: (context_parallel.TRAFFIC[k] - sent0[k]) / args.steps for k in sent0}
        predicted = context_parallel.traffic_per_step(cfg, args.seq, args.batch, args.cp,
                                                      itemsize=2 if device.type == "cuda" else 4)
        step_s = statistics.median(secs)
        tokens = args.seq * args.batch * dims.dp_size  # per optimizer step, the whole job
        peak = torch.tensor([peak_gib(device)[0] or 0.0], device=device)
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        dist.all_gather(peaks, peak)
        result = {"preset": args.preset, "cp": args.cp, "world": world, "dims": str(dims), "seq_len": args.seq,
                  # fp32 weights and AdamW states, bf16 compute (train.py's recipe): FSDP2 shards them over
                  # dp_shard x cp when world > 1; one rank holds them whole (launch.plan --weights fp32-master)
                  "weights": "fp32-master", "states_sharded_over": world if world > 1 else 1,
                  "batch_per_dp_rank": args.batch, "ac": args.ac, "overrides": dict(args.override),
                  "compile": args.compile, "step_ms_median": step_s * 1e3, "step_ms": [s * 1e3 for s in secs],
                  "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
                  "peak_alloc_gib_per_rank": [p.item() for p in peaks],
                  "cp_bytes_sent_per_step": sent, "cp_bytes_predicted": predicted,
                  "losses": [float(x) for x in losses]}
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall = time.perf_counter() - t0
            result["profile"] = nccl_share(prof, wall, device)
        if rank == 0:
            print(json.dumps(result, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # after gloo: without the interpreter's finalization (trainer/distributed.py)
