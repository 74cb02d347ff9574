"""What running the experts as the overlapped exchange's three parts costs, without any communication (one device).

`parallel.ep_exchange=overlap` (parallel/ep_overlap.py) runs a rank's local experts as three parts: half of the rows
it keeps for its own experts, the rows from the other ranks, the other half of its own rows. This times one MoE
layer's local experts, forward and backward, on one device, three ways:

  one       every received row in one part, through autograd (what the sized exchange runs)
  autograd  the three parts, each through autograd: a weight-gradient GEMM over each part's few rows and three
            accumulations of the whole weight gradient (what the overlap ran until the split below)
  split     the three parts as the overlap runs them now (jamba/experts_split.py): each part's input gradient on
            its own, the weight gradients once over the own rows (which the two halves keep contiguous) and once
            over the received rows
  split_one every row in one part through the split functions (their own cost, against one)
Forward alone is timed as well (activations kept, as in training), for one and split.

The variants are checked against one part (output, input gradient, weight gradients) before they are timed.
`breakdown_ms` times each step of split and split_one (CUDA events between the calls).
Default shape: bench-3b at ep=2 and balanced routing, so 4 local experts (hidden 2048, intermediate 5632) receive
32768 rows, half of them the rank's own; bf16 weights and rows as under FSDP's mixed precision. The per-step
estimate multiplies by the number of MoE layers (`--layers`, 8 in bench-3b).

    python -m launch.bench_expert_parts                                   # CUDA
    python -m launch.bench_expert_parts --device cpu --rows 256 --hidden 32 --intermediate 64 --iters 2
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch

from jamba.moe import GroupedExperts
from launch.bench_exchange import splits_for
from launch.results import report_json
from jamba import experts_split as experts
from parallel.ep_overlap import split_counts


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
    """The inputs of the variants, built once (the timed functions run the experts only)."""
    xs, cs, xr, cr, gy = case
    perm = grouped_order(cs, cr)
    x_all = torch.cat([xs, xr])
    one = (x_all.index_select(0, perm), cs + cr, gy.index_select(0, perm))
    a = xs.shape[0] // 2
    c1, c2 = split_counts(cs, a)
    n_own = xs.shape[0]
    parts = (xs.clone(), a, c1, c2, cs, xr, cr, gy[:n_own], gy[n_own:])
    return perm, one, parts


def run_one(mod: GroupedExperts, x, counts, g):
    """Every row in one part, forward and backward. Returns (output, input gradient), grouped by expert."""
    leaf = x.detach().requires_grad_()
    y = mod(leaf, counts)
    y.backward(g)
    return y.detach(), leaf.grad


def _part(mod, x, counts):
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        return leaf, mod(leaf, counts)


def _part_backward(leaf, y, g):
    torch.autograd.backward(y, g)
    return leaf.grad


def run_autograd(mod: GroupedExperts, x_own, a, c1, c2, cs, xr, cr, g_own, g_r):
    """The three parts in the overlap's order (own first half, the others' rows, own second half; the backward in
    reverse), each through autograd. Returns (output, input gradient) in the (own rows, others' rows) order."""
    l1, y1 = _part(mod, x_own[:a], c1)
    lr, yr = _part(mod, xr, cr)
    l2, y2 = _part(mod, x_own[a:], c2)
    d2 = _part_backward(l2, y2, g_own[a:])
    dr = _part_backward(lr, yr, g_r)
    d1 = _part_backward(l1, y1, g_own[:a])
    return torch.cat([y1.detach(), y2.detach(), yr.detach()]), torch.cat([d1, d2, dr])


def _weights(mod: GroupedExperts):
    return (mod.gate_proj.detach(), mod.up_proj.detach(), mod.down_proj.detach())


def fwd_split(mod: GroupedExperts, x_own, a, c1, c2, cs, xr, cr, g_own, g_r):
    """The overlap's forward (parallel/ep_overlap.py): the halves write h into one buffer of the own rows."""
    w = _weights(mod)
    _mark("start")
    h_own = x_own.new_empty(x_own.shape[0], w[0].shape[1])
    y1, p1 = experts.forward(x_own[:a], c1, w, h_out=h_own[:a])
    _mark("forward own 1st half")
    yr, pr = experts.forward(xr, cr, w)
    _mark("forward received")
    y2, p2 = experts.forward(x_own[a:], c2, w, h_out=h_own[a:])
    _mark("forward own 2nd half")
    return (y1, yr, y2), (p1, pr, p2, h_own)


_MARKS = None  # while `breakdown` runs: [(name, CUDA event or time)] after each step of run_split / run_split_one


def _mark(name: str) -> None:
    if _MARKS is None:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        _MARKS.append((name, e))
    else:
        _MARKS.append((name, time.perf_counter()))


def run_split(mod: GroupedExperts, x_own, a, c1, c2, cs, xr, cr, g_own, g_r):
    """The overlap's forward and backward: input gradients per part (second half, received rows, first half), then
    the weight gradients of the own rows at once and of the received rows, summed into the weights' .grad.
    Returns (output, input gradient) in the (own rows, others' rows) order."""
    w = _weights(mod)
    (y1, yr, y2), (p1, pr, p2, h_own) = fwd_split(mod, x_own, a, c1, c2, cs, xr, cr, g_own, g_r)
    dg_own, du_own = h_own.new_empty(h_own.shape), h_own.new_empty(h_own.shape)
    d2, _, _ = experts.input_grad(p2, g_own[a:], w, dg_out=dg_own[a:], du_out=du_own[a:])
    _mark("input grad own 2nd half")
    dr, dg_r, du_r = experts.input_grad(pr, g_r, w)
    _mark("input grad received")
    d1, _, _ = experts.input_grad(p1, g_own[:a], w, dg_out=dg_own[:a], du_out=du_own[:a])
    _mark("input grad own 1st half")
    dw = experts.weight_grad(x_own, h_own, g_own, dg_own, du_own, cs)
    _mark("weight grad own")
    dw_r = experts.weight_grad(xr, pr.h, g_r, dg_r, du_r, cr)
    _mark("weight grad received")
    for acc, t in zip(dw, dw_r):
        acc.add_(t)
    _mark("weight grad sum")
    for p, t in zip(mod.parameters(), dw):
        p.grad = t
    return torch.cat([y1, y2, yr]), torch.cat([d1, d2, dr])


def run_split_one(mod: GroupedExperts, x, counts, g):
    """Every row in one part through jamba/experts_split.py (against run_one: the split functions' own cost)."""
    w = _weights(mod)
    _mark("start")
    y, saved = experts.forward(x, counts, w)
    _mark("forward")
    dx, dg, du = experts.input_grad(saved, g, w)
    _mark("input grad")
    for p, t in zip(mod.parameters(), experts.weight_grad(x, saved.h, g, dg, du, counts)):
        p.grad = t
    _mark("weight grad")
    return y, dx


def breakdown(fn, mod, inputs, iters: int) -> Dict[str, float]:
    """ms per step of fn (run_split or run_split_one), between its marks, averaged over iters runs."""
    global _MARKS
    sums: Dict[str, float] = {}
    for _ in range(iters):
        mod.zero_grad(set_to_none=True)
        _MARKS = []
        fn(mod, *inputs)
        marks, _MARKS = _MARKS, None
        if isinstance(marks[0][1], torch.cuda.Event):
            torch.cuda.synchronize()
            dts = [a[1].elapsed_time(b[1]) for a, b in zip(marks, marks[1:])]
        else:
            dts = [(b[1] - a[1]) * 1e3 for a, b in zip(marks, marks[1:])]
        for (name, _), dt in zip(marks[1:], dts):
            sums[name] = sums.get(name, 0.0) + dt
    return {k: round(v / iters, 3) for k, v in sums.items()}


def _in_own_order(perm: torch.Tensor, fn):
    """fn's (output, input gradient), grouped by expert, back in the (own rows, others' rows) order, as check wants."""
    def wrapped(mod, *inputs):
        y, d = fn(mod, *inputs)
        return torch.empty_like(y).index_copy(0, perm, y), torch.empty_like(d).index_copy(0, perm, d)
    wrapped.__name__ = fn.__name__
    return wrapped


def fwd_one(mod: GroupedExperts, x, counts, g):
    """run_one's forward only (recording the graph, as in training)."""
    return mod(x.detach().requires_grad_(), counts)


def _weight_grads(mod: GroupedExperts) -> List[torch.Tensor]:
    return [p.grad.detach().clone() for p in mod.parameters()]


def check(mod: GroupedExperts, perm: torch.Tensor, one, fn, parts, tol: float) -> Dict[str, float]:
    """Relative differences of fn's (run_autograd or run_split) output, input gradient and weight gradients from
    the single part's."""
    mod.zero_grad(set_to_none=True)
    y, d = run_one(mod, *one)
    y1 = torch.empty_like(y).index_copy(0, perm, y)  # back to the (own rows, others' rows) order
    d1 = torch.empty_like(d).index_copy(0, perm, d)
    w1 = _weight_grads(mod)
    mod.zero_grad(set_to_none=True)
    y3, d3 = fn(mod, *parts)
    w3 = _weight_grads(mod)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()  # noqa: E731
    err = {"y": rel(y3, y1), "x.grad": rel(d3, d1)}
    err.update({f"{n}.grad": rel(a, b) for (n, _), a, b in zip(mod.named_parameters(), w3, w1)})
    bad = {k: v for k, v in err.items() if not v <= tol}
    if bad:
        raise AssertionError(f"{fn.__name__} differs from one part beyond {tol:g}: {bad}")
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
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    err = {name: check(mod, perm, one_in, fn, parts_in, tol) for name, fn in (("autograd", run_autograd),
                                                                              ("split", run_split))}
    err["split_one"] = check(mod, perm, one_in, _in_own_order(perm, run_split_one), one_in, tol)
    ms = {"one": time_variant(run_one, mod, one_in, args.iters, args.warmup, device),
          "autograd": time_variant(run_autograd, mod, parts_in, args.iters, args.warmup, device),
          "split": time_variant(run_split, mod, parts_in, args.iters, args.warmup, device),
          "split_one": time_variant(run_split_one, mod, one_in, args.iters, args.warmup, device)}
    fwd = {"one": time_variant(fwd_one, mod, one_in, args.iters, args.warmup, device),
           "split": time_variant(fwd_split, mod, parts_in, args.iters, args.warmup, device)}
    extra = {k: round((ms[k] - ms["one"]) * args.layers, 2) for k in ("autograd", "split")}
    result = {"shape": {k: getattr(args, k) for k in ("rows", "experts", "own_share", "hidden", "intermediate")},
              "dtype": str(dtype), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "ms_per_layer": {k: round(v, 3) for k, v in ms.items()},
              "forward_ms_per_layer": {k: round(v, 3) for k, v in fwd.items()},
              "extra_ms_per_step": extra, "layers": args.layers, "check_rel_err": err,
              "breakdown_ms": {"split": breakdown(run_split, mod, parts_in, args.iters),
                               "split_one": breakdown(run_split_one, mod, one_in, args.iters)}}
    print(f"ms per layer, forward+backward: one part {ms['one']:.3f}, three parts through autograd "
          f"{ms['autograd']:.3f}, split {ms['split']:.3f} (forward alone: one {fwd['one']:.3f}, split "
          f"{fwd['split']:.3f}); x {args.layers} layers, ms per step above one part: autograd "
          f"{extra['autograd']:+.2f}, split {extra['split']:+.2f}; all rows as one part through the split "
          f"functions {ms['split_one']:.3f}", flush=True)
    for name, parts in result["breakdown_ms"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
    report_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
