"""One MoE layer's forward and backward as rank 0 of an expert-parallel group, on one device, with the wire left out.

What an EP exchange costs besides moving rows: its host sync, the host's time to launch what follows it (the GPU
idles meanwhile), its reorders and copies, and, for the overlap, its split into parts. The process group is
torch's fake backend (`torch.testing._internal.distributed.fake_pg`): the all-to-alls return at once and move
nothing (but the counts, handed back as sent), so the received rows are whatever the buffers held (timing only:
the numbers are not checked here;
tests/parallel/test_ep_overlap.py and test_parallel_layouts.py check the exchanges). Routing is forced
round-robin (`model.moe_force_balance`), so each expert gets the same rows and, at ep=2, half of a rank's rows
stay local, as the exchanges then assume of the other rank too.

  plain    no EP: every expert local (what one GPU runs)
  sized    parallel.ep_exchange=sized
  overlap  parallel.ep_exchange=overlap
  padded   parallel.ep_exchange=padded (no host sync, ep x the rows)

The per-step estimate multiplies by the MoE layers of the preset (8 in bench-3b). Default: bench-3b's MoE layer,
4 sequences of 4096 tokens, bf16 weights and activations.

    python -m launch.bench_ep_layer                                     # CUDA
    python -m launch.bench_ep_layer --device cpu --preset tiny --seq 64 --batch 2 --iters 2
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from launch.results import report_json

VARIANTS = ("plain", "sized", "overlap", "padded")


def _fake_group(ep: int) -> None:
    """rank 0 of `ep` ranks on torch's fake backend (collectives return at once, nothing moves)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if not dist.is_initialized():
        dist.init_process_group("fake", rank=0, world_size=ep, store=FakeStore())
    elif dist.get_world_size() != ep:
        raise RuntimeError(f"a process group of {dist.get_world_size()} ranks exists; this needs {ep}")


def _counts_pass_through() -> None:
    """The exchanges size their buffers from the counts they receive, but the fake all-to-all leaves its output
    as it was on CUDA (it copies on CPU). Integer all-to-alls (the counts) hand back the counts sent: with forced
    balance that is what every rank would send. The rows' all-to-alls stay empty-handed (timing only)."""
    real = dist.all_to_all_single
    if getattr(real, "_counts_pass_through", False):
        return

    def all_to_all_single(output, input, *args, **kwargs):
        work = real(output, input, *args, **kwargs)
        if not output.is_floating_point() and output.shape == input.shape:
            output.copy_(input)
        return work

    all_to_all_single._counts_pass_through = True
    dist.all_to_all_single = all_to_all_single


def moe_layers(preset: str) -> List[int]:
    """Indices of the full preset's MoE layers."""
    from jamba.config import get_preset

    return [i for i, spec in enumerate(get_preset(preset).layer_specs()) if spec.ffn == "moe"]


def build_layer(preset: str, variant: str, ep: int, device: torch.device, dtype: torch.dtype):
    """The preset's first MoE layer (its feed-forward block), with `variant`'s expert parallelism applied."""
    from jamba.config import get_preset
    from launch.bench import build_ours
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims
    from parallel.expert_parallel import apply_experts

    first_moe = moe_layers(preset)[0]
    cfg = get_preset(preset, moe_force_balance=True, num_hidden_layers=first_moe + 1)
    model = build_ours(cfg, device, dtype, seed=0)
    if variant != "plain":
        _fake_group(ep)
        _counts_pass_through()
        dims = ParallelDims(ParallelConfig(ep=ep, ep_exchange=variant), world_size=ep, model=cfg)
        dims.build_mesh(device.type)
        apply_experts(model, dims)
    return model.model.layers[first_moe].feed_forward, cfg


def time_layer(moe, x: torch.Tensor, g: torch.Tensor, iters: int, warmup: int) -> float:
    """ms per forward + backward of the MoE block (gradients set to None before each, as after zero_grad)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def once():
        moe.zero_grad(set_to_none=True)
        out, _ = moe(x)
        out.backward(g)

    for _ in range(warmup):
        once()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    sync()
    return (time.perf_counter() - t0) * 1e3 / iters


def profile_layer(moe, x: torch.Tensor, g: torch.Tensor, iters: int = 3) -> dict:
    """Where the layer's time goes (CUDA): compute, idle, and the longest idle gaps by the kernels around them
    (trainer/profile.py's timeline and idle_gaps), per forward + backward."""
    from trainer.profile import device_kernels, idle_gaps, timeline

    for _ in range(2):
        moe.zero_grad(set_to_none=True)
        moe(x)[0].backward(g)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            moe.zero_grad(set_to_none=True)
            moe(x)[0].backward(g)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e6
    kernels = device_kernels(prof)
    t = timeline(kernels, wall)
    gaps = idle_gaps(kernels, top=5)
    by_name: Dict[str, float] = {}
    for name, a, b in kernels:
        by_name[name[:60]] = by_name.get(name[:60], 0.0) + (b - a)
    return {"ms": {k[:-3]: round(v / iters / 1e3, 3) for k, v in t.items() if k.endswith("_us")},
            "top_gaps": [{"after": d["after"][:60], "before": d["before"][:60], "count": d["count"] / iters,
                          "ms": round(d["us"] / iters / 1e3, 3)} for d in gaps["top"]],
            "kernels_ms": {k: round(v / iters / 1e3, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m launch.bench_ep_layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-3b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true", help="CUDA: also profile each variant (compute, idle, gaps)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if args.ep < 2:
        p.error(f"--ep {args.ep}: expert parallelism needs at least 2 ranks")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu with --preset tiny")
    if args.profile and device.type != "cuda":
        p.error("--profile needs --device cuda (it reads the GPU's kernels)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ms: Dict[str, float] = {}
    profiles: Dict[str, dict] = {}
    for v in variants:
        moe, cfg = build_layer(args.preset, v, args.ep, device, dtype)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=g).to(device, dtype).requires_grad_()
        dy = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=g).to(device, dtype)
        ms[v] = time_layer(moe, x, dy, args.iters, args.warmup)
        if args.profile:
            profiles[v] = profile_layer(moe, x, dy)
        del moe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    full = len(moe_layers(args.preset))
    base = ms.get("plain")
    result = {"preset": args.preset, "seq": args.seq, "batch": args.batch, "ep": args.ep, "dtype": str(dtype),
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "ms_per_layer": {k: round(v, 3) for k, v in ms.items()}, "moe_layers": full,
              "above_plain_ms_per_step": {k: round((v - base) * full, 2) for k, v in ms.items()
                                          if base is not None and k != "plain"}}
    if profiles:
        result["profile"] = profiles
    print("ms per MoE layer, forward+backward: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
          + (f"; above plain, x {full} MoE layers: " + ", ".join(
              f"{k} {v:+.2f} ms per step" for k, v in result["above_plain_ms_per_step"].items()) if base else ""),
          flush=True)
    for v, prof in profiles.items():
        print(f"{v}: " + ", ".join(f"{k} {x:.3f}" for k, x in prof["ms"].items()) + " ms; gaps: " + "; ".join(
            f"{d['after'][:40]} -> {d['before'][:40]} x{d['count']:g} {d['ms']:.3f}" for d in prof["top_gaps"]),
            flush=True)
    report_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
