"""One training step under the profiler, on a real run, to see where the time goes:

    JAMBA_PROFILE_STEP=12 torchrun --nproc_per_node 2 train.py ...

Each rank writes `<run_dir>/profile/step<N>_rank<r>.json` (a Chrome trace: open it in https://ui.perfetto.dev)
and logs the step's top device kernels, the share of the step the device was busy, and on CUDA the host
synchronisations of the step with the Python lines that caused them (`torch.cuda.set_sync_debug_mode`).
An environment variable rather than a config key: it is a diagnosis, not part of a run's recipe.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)
ENV = "JAMBA_PROFILE_STEP"
# Kernels only: the profiler also lists ranges such as "nccl:all_reduce" with device time, which would count
# the same kernel twice (seen on 2 H200s: AllReduce 186 ms and a "Reduce" 186 ms for one TP step).
_NCCL = re.compile(r"^nccl(Dev)?Kernel", re.IGNORECASE)
_KINDS = ("AllReduce", "ReduceScatter", "AllGather", "SendRecv", "Broadcast", "Reduce", "AllToAll")


def nccl_kind(kernel: str) -> Optional[str]:
    """'ncclDevKernel_AllReduce_Sum_bf16_RING_LL(...)' -> 'AllReduce'; None for a non-NCCL kernel."""
    if not _NCCL.search(kernel):
        return None
    for kind in _KINDS:  # AllReduce before Reduce
        if kind.lower() in kernel.lower():
            return kind
    return "other"


def _union_us(intervals: List[Tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def timeline(kernels: Iterable[Tuple[str, float, float]], wall_us: float) -> dict:
    """Where a profiled window's wall time went, from its device kernels `(name, start_us, end_us)`.

    NCCL kernels run on their own streams, so their summed time says little about what they cost: FSDP's
    all-gathers and reduce-scatters overlap the layers' compute, while an all-to-all whose split sizes the
    host must read first does not. The union of the other kernels' intervals is the time some computation
    ran (`compute_us`); NCCL time outside it is communication nothing hid (`exposed_comm_us`); wall time under
    no kernel at all is the device waiting on the host (`idle_us`: Python, launches, host syncs).
    Kernels of several devices (not the case in one rank's profile) would be merged as one."""
    comp, comm = [], []
    for name, a, b in kernels:
        (comm if nccl_kind(name) is not None else comp).append((a, b))
    compute = _union_us(comp)
    busy = _union_us(comp + comm)
    comm_total = _union_us(comm)
    exposed = busy - compute
    return {"wall_us": wall_us, "compute_us": compute, "comm_us": comm_total, "exposed_comm_us": exposed,
            "overlapped_comm_us": comm_total - exposed, "idle_us": max(wall_us - busy, 0.0)}


def idle_gaps(kernels: Iterable[Tuple[str, float, float]], min_us: float = 20.0, top: int = 10) -> dict:
    """The stretches with no kernel running on any stream longer than `min_us`, grouped by the kernel that
    ended last before the gap and the one that started it: where the device ran dry and what it then waited
    for (a host sync drains the queue after its last kernel; eager code the host issues more slowly than the
    device runs it leaves many short gaps between the same pairs). Idle time before the first kernel and
    after the last one is not a gap here."""
    groups: dict = {}
    gaps = 0
    idle = 0.0
    for start, end, last, name, _ in _gaps(sorted((a, b, name, None) for name, a, b in kernels), min_us):
        gaps += 1
        idle += end - start
        _add(groups, last, name, end - start)
    return {"min_us": min_us, "gaps": gaps, "idle_us": idle, "top": _top(groups, top)}


def _gaps(ops: Iterable[Tuple[float, float, str, object]], min_us: float):
    """ops (start, end, name, tag) on any streams, sorted by start -> (gap start, gap end, name of the op that ended
    last before it, name and tag of the op that ends it) for every stretch longer than `min_us` with no op running."""
    end, last = None, ""
    for a, b, name, tag in ops:
        if end is not None and a - end > min_us:
            yield end, a, last, name, tag
        if end is None or b > end:
            end, last = b, name


def _add(groups: dict, after: str, before: str, us: float) -> None:
    g = groups.setdefault((after[:90], before[:90]), [0, 0.0])
    g[0] += 1
    g[1] += us


def _top(groups: dict, top: int) -> list:
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return [{"after": k[0], "before": k[1], "count": c, "us": us} for k, (c, us) in rows[:top]]


_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_CATS = ("cuda_runtime", "cuda_driver")
_HOST_OP_CATS = ("cpu_op", "user_annotation", "python_function")


def host_bound_idle(trace_events: Iterable[dict], min_us: float = 20.0, top: int = 10) -> dict:
    """How much of the device's idle time waited for the host, from a Chrome trace's `traceEvents` (torch.profiler's
    `export_chrome_trace`, CPU and CUDA activities). A gap (no kernel, copy or memset on any stream for more than
    `min_us`) is host-bound for as long as the operation that ends it had not been issued yet: from the gap's start
    until the host call that enqueued it began (matched by its correlation id). That is Python, launch overhead or
    a host sync draining the queue. It is a lower bound: the rest of a gap is not attributed by this rule (the device
    waiting on itself, e.g. a stream waiting for an event of another stream or an NCCL kernel for its peer, but also
    an operation issued early behind a wait on an event the host recorded late).
    Operations whose host call is not in the trace make their gaps `unattributed_us`. Host-bound gaps are grouped
    like `idle_gaps` (the operation before and the one after), largest first; `host_ops` lists the host operations
    (aten ops, autograd nodes, compiled regions, annotations) that ran during the host-bound stretches."""
    launched: dict = {}  # correlation id -> start of the host call that enqueued the operation
    ops, host_ops = [], []
    for e in trace_events:
        if e.get("ph") != "X":
            continue
        corr, cat = (e.get("args") or {}).get("correlation"), e.get("cat", "")
        if cat in _DEVICE_CATS:
            ops.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""), corr))
        elif cat in _HOST_CATS and corr is not None:
            launched[corr] = float(e["ts"])
        elif cat in _HOST_OP_CATS and not e.get("name", "").startswith("ProfilerStep"):
            host_ops.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "")))
    stretches = []  # (start, end) of the host-bound parts of the gaps, in time order
    groups: dict = {}
    idle = host = unknown = 0.0
    gaps = 0
    for start, end, last, name, corr in _gaps(sorted(ops, key=lambda o: (o[0], o[1])), min_us):
        idle += end - start
        gaps += 1
        issued = launched.get(corr)
        if issued is None:
            unknown += end - start
        elif issued > start:
            waited = min(issued, end) - start
            host += waited
            stretches.append((start, start + waited))
            _add(groups, last, name, waited)
    return {"min_us": min_us, "gaps": gaps, "idle_us": idle, "host_bound_us": host, "host_bound_gaps": len(stretches),
            "unattributed_us": unknown, "top": _top(groups, top), "host_ops": _ops_during(host_ops, stretches, top)}


def _ops_during(host_ops: List[Tuple[float, float, str]], stretches: List[Tuple[float, float]], top: int) -> list:
    """What the host was running while the device waited for it: for each host operation name, its time inside the
    host-bound stretches (inclusive: a parent and its children each count their own overlap, as in a flame graph;
    on every host thread), largest first."""
    starts = [a for a, _ in stretches]
    inside: dict = collections.defaultdict(float)
    for a, b, name in host_ops:
        i = max(bisect.bisect_right(starts, a) - 1, 0)
        while i < len(stretches) and stretches[i][0] < b:
            lo, hi = max(a, stretches[i][0]), min(b, stretches[i][1])
            if hi > lo:
                inside[name[:90]] += hi - lo
            i += 1
    return [{"op": k, "us": v} for k, v in sorted(inside.items(), key=lambda kv: -kv[1])[:top]]


def pair_waits(durations_by_rank: List[List[float]]) -> dict:
    """Split the time of a collective every rank runs in the same order (EP's all-to-alls) into moving data and
    waiting for the other ranks. `durations_by_rank[r][i]`: rank r's kernel time of its i-th such collective.
    A collective's kernel starts when its stream reaches it and ends when all ranks are done, so the rank that
    arrives last waits for no one: the shortest of the ranks' times is the exchange itself, and each rank's
    excess over it is time it waited for a peer that came later (a peer with more expert rows to compute, or
    further behind for any other reason). Returns totals in the durations' unit; the first
    `min(len)` collectives are paired (ranks that ran different numbers are reported, not guessed at)."""
    counts = [len(d) for d in durations_by_rank]
    n = min(counts) if counts else 0
    shortest = [min(d[i] for d in durations_by_rank) for i in range(n)]
    waits = [sum(d[i] - shortest[i] for i in range(n)) for d in durations_by_rank]
    return {"count": n, "counts_by_rank": counts, "total_by_rank": [sum(d[:n]) for d in durations_by_rank],
            "exchange": sum(shortest), "wait_by_rank": waits}


def device_kernels(prof) -> List[Tuple[str, float, float]]:
    """(name, start_us, end_us) of the CUDA kernels of a finished torch.profiler run (not GPU annotations
    such as "nccl:all_reduce" ranges, which span kernels already listed)."""
    cuda = torch.autograd.DeviceType.CUDA
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if getattr(e, "device_type", None) == cuda and not getattr(e, "is_user_annotation", False)]


def timeline_line(t: dict) -> str:
    pct = (lambda us: 100 * us / t["wall_us"]) if t["wall_us"] else (lambda us: 0.0)
    return (f"of the wall time: compute {pct(t['compute_us']):.1f}%, NCCL not hidden by compute "
            f"{pct(t['exposed_comm_us']):.1f}% (NCCL under compute {t['overlapped_comm_us'] / 1e3:.1f} ms), "
            f"device idle {pct(t['idle_us']):.1f}%")


def profile_step() -> Optional[int]:
    """The step (1-based, as logged) named by JAMBA_PROFILE_STEP, if any."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV}={value!r}: give a step number >= 1 (e.g. {ENV}=12; after compilation and warm-up)")
    return int(value)


def is_sync_warning(message) -> bool:
    """A warning of `torch.cuda.set_sync_debug_mode("warn")` about one synchronising call; not its notice that
    the mode is a prototype ("Synchronization debug mode is a prototype feature ..."), which the first
    set_sync_debug_mode of a process emits and which is no sync."""
    return "called a synchronizing" in str(message).lower()


@contextlib.contextmanager
def host_syncs(enabled: bool = True):
    """Where the host synchronised with the CUDA device in the body: the list it yields gets one "file:line"
    per synchronising call that `torch.cuda.set_sync_debug_mode("warn")` reports, filled when the body ends
    (left empty when not `enabled`, e.g. on CPU)."""
    found: List[str] = []
    if not enabled:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(f"{w.filename}:{w.lineno}" for w in caught if is_sync_warning(w.message))


@contextlib.contextmanager
def profiled(out_dir: Path, step: int, rank: int, device: torch.device):
    """Profile the body (one training step); write the trace and log the summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        try:
            with host_syncs(cuda) as found:
                yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / f"step{step}_rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20)
    kernels = device_kernels(prof) if cuda else []
    kernel_us = sum(end - start for _, start, end in kernels)
    syncs = collections.Counter(found)
    lines = [f"profile of step {step} on rank {rank}: {wall * 1e3:.1f} ms wall; trace {trace}"]
    if cuda:
        lines.append(f"device kernels {kernel_us / 1e3:.1f} ms = {kernel_us / 1e4 / wall:.0f}% of the wall time "
                     f"(streams overlap: NCCL kernels count too)")
        lines.append(timeline_line(timeline(kernels, wall * 1e6)))
        gaps = idle_gaps(kernels, top=5)
        lines.append(f"idle gaps > {gaps['min_us']:.0f} us: {gaps['gaps']}, {gaps['idle_us'] / 1e3:.1f} ms"
                     + "".join(f"\n  {g['us'] / 1e3:.2f} ms in {g['count']} after {g['after']} before {g['before']}"
                               for g in gaps["top"]))
        lines.append(f"host syncs: {sum(syncs.values())}" + "".join(f"\n  {n} x {where}"
                                                                     for where, n in syncs.most_common(10)))
    log.info("%s\n%s", "\n".join(lines), table)
