"""The Mamba-1 selective scan alone: our CUDA kernel against mamba-ssm's.

For each (batch, d_inner, seq, d_state) shape this times forward and forward+backward (median of `--iters`,
CUDA events) of mamba-ssm's `selective_scan_fn` and of ours (`jamba.ops.selective_scan_cuda`, compiled on
first use), on the operands the Jamba mixer passes (bf16 u, delta, z; B and C as strided views of one
projection; fp32 A, D, delta_bias; softplus). It also reports each output's and gradient's largest difference
to an fp32 run of mamba-ssm, relative to that run's largest magnitude, for both kernels: mamba-ssm's own bf16
error is the rounding floor ours is held to (tests/jamba/test_selective_scan_cuda.py).

    python -m launch.bench_scan --shapes 4x4096x4096x16,1x4096x16384x16 --state-every 16,256

`--state-every` times ours once per interval between the states its forward keeps (16: one per tile, so the
backward does not re-run the forward; 256: 1/16 of that memory; see `state_interval`).

`JAMBA_SCAN_OCC=F,B` picks the blocks-per-SM register budgets our kernels are compiled for (see
jamba/ops/csrc/selective_scan.cu); it is read once per process, so sweep it with one run per value.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from launch.bench_ops import median_ms
from launch.results import report_json

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(bsz: int, dim: int, L: int, N: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(bsz, dim, L).to(device, dtype)
    delta = (r(bsz, dim, L) * 0.5 - 1.0).to(device, dtype)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).to(device) * (0.5 + torch.rand(dim, N, generator=g).to(device))
    xb = r(bsz, L, 2 * N).to(device, dtype)  # B, C as views of one (batch, L, 2N) tensor, like the mixer's x_proj
    B, C = xb[..., :N].transpose(1, 2), xb[..., N:].transpose(1, 2)
    D = r(dim).to(device)
    z = r(bsz, dim, L).to(device, dtype)
    bias = (r(dim) * 0.5 - 3.0).to(device)
    return [u, delta, A, B, C, D, z, bias]


def run_once(fn, inputs, dout):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def timed(fn, inputs, dout, iters: int, backward: bool) -> float:
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def once():
        out = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
        if backward:
            out.backward(dout)
            for t in leaves:
                t.grad = None

    return median_ms(once, iters)


def rel_errs(outs, grads, ref_out, ref_grads) -> dict:
    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
    errs = {"out": rel(outs, ref_out)}
    errs.update({n: rel(a, b) for n, a, b in zip(NAMES, grads, ref_grads)})
    return errs


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(prog="python -m launch.bench_scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4x4096x4096x16,1x4096x16384x16", help="BATCHxDIMxSEQxSTATE,...")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--state-every", default="16,256",
                   help="ours' state intervals to time, comma-separated multiples of 16 up to 256 (default 16,256)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    try:
        intervals = list(dict.fromkeys(int(v) for v in args.state_every.split(",")))  # each once, in order
    except ValueError:
        p.error(f"--state-every {args.state_every!r}: expected comma-separated integers such as 16,256")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from jamba.ops import selective_scan_cuda as ours
    if ours.extension() is None:
        p.error(f"our CUDA scan did not build: {ours.build_error()}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; our kernels' [regs, spill bytes, smem] "
          f"fwd / bwd chunked / bwd per tile: {ours.extension().kernel_info()}")
    rows = []
    for shape in args.shapes.split(","):
        bsz, dim, L, N = (int(v) for v in shape.split("x"))
        inputs = make_inputs(bsz, dim, L, N, torch.bfloat16, "cuda")
        dout = torch.randn(bsz, dim, L, device="cuda", dtype=torch.bfloat16)
        f32 = [t.float() if t.is_floating_point() else t for t in inputs]
        o32, g32 = run_once(selective_scan_fn, f32, dout.float())
        row = {"shape": shape}
        impls = [("mamba_ssm", selective_scan_fn)] + [
            (f"ours_every{e}", functools.partial(ours.selective_scan_cuda, state_every=e)) for e in intervals]
        for name, fn in impls:
            out, grads = run_once(fn, inputs, dout)
            row[name] = {"fwd_ms": timed(fn, inputs, dout, args.iters, False),
                         "fwd_bwd_ms": timed(fn, inputs, dout, args.iters, True),
                         "bf16_vs_mamba_fp32": rel_errs(out, grads, o32, g32)}
        m = row["mamba_ssm"]
        print(f"{shape}: mamba-ssm fwd {m['fwd_ms']:.3f} ms, fwd+bwd {m['fwd_bwd_ms']:.3f} ms", flush=True)
        for name, _ in impls[1:]:
            o = row[name]
            o["speedup_fwd_bwd"] = m["fwd_bwd_ms"] / o["fwd_bwd_ms"]
            print(f"  {name}: fwd {o['fwd_ms']:.3f} ms, fwd+bwd {o['fwd_bwd_ms']:.3f} ms "
                  f"({o['speedup_fwd_bwd']:.2f}x mamba-ssm)", flush=True)
        for name, _ in impls:
            errs = row[name]["bf16_vs_mamba_fp32"]
            print(f"  {name:12s} bf16 vs fp32: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
        rows.append(row)
        del inputs, dout
        torch.cuda.empty_cache()
    report_json(rows, args.json, echo=False)
    return rows


if __name__ == "__main__":
    main()
