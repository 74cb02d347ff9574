"""How fast the expert-parallel token exchange moves its rows, by transport, outside the model.

One EP all-to-all at the shape of a MoE layer: every rank holds `--rows` rows (tokens x top-k) of `--hidden`
values and sends an equal share to every rank (itself included), as `parallel.ep_exchange=sized` does at
balanced routing. bench-3b on 2 GPUs: 16384 tokens x top-2 = 32768 rows of 2048 bf16 values, 64 MiB to the
peer and 64 MiB to itself per exchange, 32 exchanges per step (8 MoE layers, 2 forward, 2 backward).

Transports:
  nccl       dist.all_to_all_single with split sizes, what the exchange uses
  nccl_p2p   the own share copied locally, the others' by batched isend/irecv (NCCL send/recv without self)
  symm_ce    (CUDA) symmetric memory: each rank stages its rows in its buffer, a barrier, every rank pulls its
             share from each peer's buffer with a copy-engine copy, a barrier (no SMs move the peer's bytes)
  symm_sm    (CUDA) as symm_ce, the pulls by an elementwise kernel (SMs read the peer over NVLink)

Each transport's result is checked against the rows it should have received before it is timed. NCCL's
send/recv channels are set by environment variables read when a communicator is created
(NCCL_MIN_P2P_NCHANNELS, NCCL_P2P_NVL_CHUNKSIZE, ...): compare them by running this script once per setting.

    torchrun --standalone --nproc_per_node 2 -m launch.bench_exchange                       # 2 GPUs
    torchrun --standalone --nproc_per_node 2 -m launch.bench_exchange --device cpu --rows 512 --hidden 64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from trainer.distributed import exit_process, init_process_group

TRANSPORTS = ("nccl", "nccl_p2p", "symm_ce", "symm_sm")


def splits_for(rows: int, ep: int) -> List[int]:
    """Equal shares of `rows` for the ep ranks, the remainder to the first ones."""
    return [rows // ep + (1 if r < rows % ep else 0) for r in range(ep)]


def make_rows(rows: int, hidden: int, dtype: torch.dtype, device: torch.device, rank: int) -> torch.Tensor:
    """Row i of rank r: i % 256 and i // 256 in columns 0 and 1, r + 1 elsewhere. Integers up to 256 are exact in
    bf16, so every row of up to 65,536 per rank is told apart from every other, even in bf16 (hidden >= 3)."""
    if hidden < 3:
        raise ValueError(f"--hidden {hidden}: at least 3 values per row are needed to tag each row")
    i = torch.arange(rows, device=device, dtype=torch.float32)
    x = torch.full((rows, hidden), float(rank + 1), dtype=torch.float32, device=device)
    x[:, 0], x[:, 1] = i % 256, torch.div(i, 256, rounding_mode="floor")
    return x.to(dtype)


def expected_rows(rows: int, hidden: int, dtype, device, rank: int, ep: int) -> torch.Tensor:
    """What `rank` receives: from each source s, in rank order, s's share for `rank`."""
    parts = []
    for s in range(ep):
        sp = splits_for(rows, ep)
        start = sum(sp[:rank])
        parts.append(make_rows(rows, hidden, dtype, device, s)[start:start + sp[rank]])
    return torch.cat(parts)


def nccl_all_to_all(x, out, send, recv, group, ctx) -> None:
    dist.all_to_all_single(out, x, recv, send, group=group)


def nccl_p2p(x, out, send, recv, group, ctx) -> None:
    rank, ep = dist.get_rank(group), dist.get_world_size(group)
    s_off = [sum(send[:r]) for r in range(ep)]
    r_off = [sum(recv[:r]) for r in range(ep)]
    out[r_off[rank]:r_off[rank] + recv[rank]].copy_(x[s_off[rank]:s_off[rank] + send[rank]])
    ops = []
    for peer in range(ep):
        if peer == rank:
            continue
        g = dist.get_global_rank(group, peer)
        ops.append(dist.P2POp(dist.isend, x[s_off[peer]:s_off[peer] + send[peer]], g, group))
        ops.append(dist.P2POp(dist.irecv, out[r_off[peer]:r_off[peer] + recv[peer]], g, group))
    for w in dist.batch_isend_irecv(ops) if ops else []:
        w.wait()


def symm_setup(x: torch.Tensor, group) -> Dict:
    """A symmetric buffer with room for this rank's send rows (the same size on every rank here)."""
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
    return {"buf": buf, "hdl": symm_mem.rendezvous(buf, group)}


def symm_pull(sm_copy: bool) -> Callable:
    def run(x, out, send, recv, group, ctx) -> None:
        hdl, buf = ctx["hdl"], ctx["buf"]
        rank, ep = hdl.rank, hdl.world_size
        buf.copy_(x)  # stage: my rows, grouped by destination rank
        hdl.barrier(channel=0)  # every rank's rows are staged
        for k in range(ep):
            src = (rank + k) % ep  # start with my own share, then the peers in a ring
            # the source's share for me starts after its shares for the ranks before me (equal splits here)
            src_send = splits_for(x.shape[0], ep)
            start = sum(src_send[:rank])
            r_off = sum(recv[:src])
            peer = hdl.get_buffer(src, tuple(x.shape), x.dtype)[start:start + recv[src]]
            dst = out[r_off:r_off + recv[src]]
            if sm_copy:
                torch.add(peer, 0, out=dst)
            else:
                dst.copy_(peer)
        hdl.barrier(channel=0)  # every rank has pulled: the buffers may be staged again
    return run


class WrongRows(RuntimeError):
    """A transport delivered other rows than it should have (on some rank)."""


def check(transport: str, which: str, out: torch.Tensor, want: torch.Tensor, group) -> None:
    """Every rank learns whether any rank received wrong rows, so that all of them stop together (one rank
    raising alone would leave the others waiting in the next collective)."""
    bad = torch.tensor([0 if torch.equal(out, want) else 1], device=out.device)
    flags = [torch.zeros_like(bad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, bad, group=group)
    wrong = [r for r, f in enumerate(flags) if f.item()]
    if wrong:
        raise WrongRows(f"{transport}: rank(s) {wrong} received wrong rows ({which} exchange)")


def bench(transport: str, args, group, device) -> Dict:
    rank, ep = dist.get_rank(group), dist.get_world_size(group)
    dtype = getattr(torch, args.dtype)
    x = make_rows(args.rows, args.hidden, dtype, device, rank)
    send = splits_for(args.rows, ep)
    recv = [splits_for(args.rows, ep)[rank]] * ep
    out = x.new_empty(sum(recv), args.hidden)
    fn = {"nccl": nccl_all_to_all, "nccl_p2p": nccl_p2p,
          "symm_ce": symm_pull(False), "symm_sm": symm_pull(True)}[transport]
    try:
        ctx = symm_setup(x, group) if transport.startswith("symm") else {}
    except Exception as e:  # noqa: BLE001 - no symmetric memory here (no CUDA build, no peer access): not a failure
        return {"transport": transport, "unavailable": f"{type(e).__name__}: {e}"[:300]}
    want = expected_rows(args.rows, args.hidden, dtype, device, rank, ep)
    out.zero_()
    fn(x, out, send, recv, group, ctx)
    check(transport, "first", out, want, group)
    for _ in range(args.warmup):
        fn(x, out, send, recv, group, ctx)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier(group)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn(x, out, send, recv, group, ctx)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / args.iters
    check(transport, "last timed", out, want, group)  # back-to-back exchanges: e.g. a barrier too few
    remote = sum(n for r, n in enumerate(send) if r != rank) * args.hidden * x.element_size()
    return {"transport": transport, "ms": round(ms, 4), "remote_bytes": remote, "remote_MiB": round(remote / 2**20, 2),
            "remote_GBps": round(remote / (ms * 1e-3) / 1e9, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32768, help="rows per rank (tokens x top-k)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--transports", default="nccl,nccl_p2p,symm_ce,symm_sm")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--label", default="", help="a name for this run's settings (e.g. its NCCL variables)")
    p.add_argument("--json", default=None, help="append one JSON line per transport here (rank 0)")
    args = p.parse_args(argv)
    transports = [t for t in args.transports.split(",") if t]
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad:
        p.error(f"unknown transport(s) {bad}; choose from {list(TRANSPORTS)}")
    if "WORLD_SIZE" not in os.environ:
        p.error("run under torchrun, e.g. torchrun --standalone --nproc_per_node 2 -m launch.bench_exchange")
    if args.device == "cpu":
        transports = [t for t in transports if not t.startswith("symm")]  # symmetric memory is CUDA-only
        init_process_group("gloo")
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    rank = dist.get_rank()
    results = []
    for t in transports:
        try:
            r = bench(t, args, group, device)
        except Exception as e:  # noqa: BLE001 - a failing transport (wrong rows, an error) is a result; exit code 1
            r = {"transport": t, "error": f"{type(e).__name__}: {e}"[:300]}
        r.update(label=args.label, rows=args.rows, hidden=args.hidden, dtype=args.dtype, ep=dist.get_world_size())
        results.append(r)
        if rank == 0:
            print(json.dumps(r), flush=True)
    if rank == 0 and args.json:
        with open(args.json, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")
    dist.destroy_process_group()
    return 1 if any("error" in r for r in results) else 0  # wrong rows or a failed exchange, any transport


if __name__ == "__main__":
    exit_process(main())  # after gloo: without the interpreter's finalization (trainer/distributed.py)
