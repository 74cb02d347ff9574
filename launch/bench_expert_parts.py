"""What running the experts as the overlapped exchange's three parts costs, without any communication (one device).

`parallel.ep_exchange=overlap` (parallel/ep_overlap.py) runs a rank's local experts as three parts: half of the rows
it keeps for its own experts, the rows from the other ranks, the other half of its own rows. Each part has its own
grouped GEMMs forward and backward, and the weight gradients are accumulated three times. On 2 H200s the overlap's
compute was 15-16 ms per bench-3b step above the sized exchange's (README, Performance), and SMs kept free for the
all-to-alls did not change that. This times one MoE layer's local experts, forward and backward, on one device:

  one     every received row in one part (what the sized exchange runs)
  parts   the overlap's three parts, through parallel/ep_overlap.py's own `_run` and `_backward`

Both variants are checked against each other (output, input gradient, weight gradients) before they are timed.
Default shape: bench-3b at ep=2 and balanced routing, so 4 local experts (hidden 2048, intermediate 5632) receive
32768 rows, half of them the rank's own; bf16 weights and rows as under FSDP's mixed precision. The per-step
estimate multiplies by the number of MoE layers (`--layers`, 8 in bench-3b).

    python -m launch.bench_expert_parts                                   # CUDA
    python -m launch.bench_expert_parts --device cpu --rows 256 --hidden 32 --intermediate 64 --iters 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List

import torch

from jamba.moe import GroupedExperts
from launch.bench_exchange import splits_for
from parallel.ep_overlap import _backward, _run, split_counts


def make_case(rows: int, experts: int, own_share: float, hidden: int, dtype, device, seed: int = 0):
    """Rows grouped as the overlap sees them: own rows (sorted by local expert), then the other ranks' rows (grouped
    by local expert), balanced over the experts. Returns (own rows, own counts, other rows, other counts, output
    gradient for all rows in that order)."""
    own = int(rows * own_share)
    per = lambda n: torch.tensor(splits_for(n, experts), device=device)  # noqa: E731 - balanced over the experts
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    return x[:own], per(own), x[own:], per(rows - own), gy


def grouped_order(cs: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """For the rows grouped by expert (each expert's own rows, then its rows from the other ranks, as the sized
    exchange orders them), their positions in the (own rows, others' rows) order."""
    n_own = int(cs.sum())
    s_off, r_off = (torch.cumsum(cs, 0) - cs).tolist(), (torch.cumsum(cr, 0) - cr).tolist()
    idx = []
    for e, (ns, nr) in enumerate(zip(cs.tolist(), cr.tolist())):
        idx += [torch.arange(s_off[e], s_off[e] + ns), n_own + torch.arange(r_off[e], r_off[e] + nr)]
    return torch.cat(idx).to(cs.device)


def prepare(case):
    """The inputs of both variants, built once (the timed functions run the experts only)."""
    xs, cs, xr, cr, gy = case
    perm = grouped_order(cs, cr)
    x_all = torch.cat([xs, xr])
    one = (x_all.index_select(0, perm), cs + cr, gy.index_select(0, perm))
    a = xs.shape[0] // 2
    c1, c2 = split_counts(cs, a)
    n_own = xs.shape[0]
    parts = (xs[:a].clone(), c1, xr, cr, xs[a:].clone(), c2, gy[:a], gy[n_own:], gy[a:n_own])
    return perm, one, parts


def run_one(mod: GroupedExperts, x, counts, g):
    """Every row in one part, forward and backward. Returns (output, input gradient), grouped by expert."""
    leaf = x.detach().requires_grad_()
    y = mod(leaf, counts)
    y.backward(g)
    return y.detach(), leaf.grad


def run_parts(mod: GroupedExperts, x1, c1, xr, cr, x2, c2, g1, gr, g2):
    """The overlap's parts in its order (own first half, the others' rows, own second half; the backward in
    reverse). Returns (output, input gradient) in the (own rows, others' rows) order."""
    l1, y1 = _run(mod, x1, c1, True)
    lr, yr = _run(mod, xr, cr, True)
    l2, y2 = _run(mod, x2, c2, True)
    d2 = _backward(l2, y2, g2)
    dr = _backward(lr, yr, gr)
    d1 = _backward(l1, y1, g1)
    return torch.cat([y1.detach(), y2.detach(), yr.detach()]), torch.cat([d1, d2, dr])


def _weight_grads(mod: GroupedExperts) -> List[torch.Tensor]:
    return [p.grad.detach().clone() for p in mod.parameters()]


def check(mod: GroupedExperts, perm: torch.Tensor, one, parts, tol: float) -> Dict[str, float]:
    """Relative differences of the parts' output, input gradient and weight gradients from the single part's."""
    mod.zero_grad(set_to_none=True)
    y, d = run_one(mod, *one)
    y1 = torch.empty_like(y).index_copy(0, perm, y)  # back to the (own rows, others' rows) order
    d1 = torch.empty_like(d).index_copy(0, perm, d)
    w1 = _weight_grads(mod)
    mod.zero_grad(set_to_none=True)
    y3, d3 = run_parts(mod, *parts)
    w3 = _weight_grads(mod)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()  # noqa: E731
    err = {"y": rel(y3, y1), "x.grad": rel(d3, d1)}
    err.update({f"{n}.grad": rel(a, b) for (n, _), a, b in zip(mod.named_parameters(), w3, w1)})
    bad = {k: v for k, v in err.items() if not v <= tol}
    if bad:
        raise AssertionError(f"the three parts differ from one part beyond {tol:g}: {bad}")
    return err


def time_variant(fn, mod, inputs, iters: int, warmup: int, device: torch.device) -> float:
    """ms per forward+backward of one layer's experts (gradients set to None before each, as after zero_grad)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        mod.zero_grad(set_to_none=True)
        fn(mod, *inputs)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        mod.zero_grad(set_to_none=True)
        fn(mod, *inputs)
    sync()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m launch.bench_expert_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32768, help="rows the rank's experts receive (default 32768)")
    p.add_argument("--experts", type=int, default=4, help="local experts (default 4: bench-3b's 8 over ep=2)")
    p.add_argument("--own-share", type=float, default=0.5, help="share of the rows that are the rank's own (1/ep)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=8, help="MoE layers per step, for the per-step estimate")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not 0 < args.own_share < 1:
        p.error(f"--own-share {args.own_share}: give a share strictly between 0 and 1 (0.5 for ep=2)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu with small shapes")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    mod = GroupedExperts(args.experts, args.hidden, args.intermediate).to(device=device, dtype=dtype)
    with torch.no_grad():
        for w in mod.parameters():
            w.normal_(0, 0.02)
    perm, one_in, parts_in = prepare(make_case(args.rows, args.experts, args.own_share, args.hidden, dtype, device))
    err = check(mod, perm, one_in, parts_in, tol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    one = time_variant(run_one, mod, one_in, args.iters, args.warmup, device)
    parts = time_variant(run_parts, mod, parts_in, args.iters, args.warmup, device)
    result = {"shape": {k: getattr(args, k) for k in ("rows", "experts", "own_share", "hidden", "intermediate")},
              "dtype": str(dtype), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "ms_per_layer": {"one": round(one, 3), "parts": round(parts, 3)},
              "parts_extra_ms_per_step": round((parts - one) * args.layers, 2), "layers": args.layers,
              "check_rel_err": err}
    print(f"one part {one:.3f} ms, three parts {parts:.3f} ms per layer (forward+backward); "
          f"x {args.layers} layers: {result['parts_extra_ms_per_step']:+.2f} ms per step", flush=True)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
