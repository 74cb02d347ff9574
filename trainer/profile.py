"""One training step under the profiler, on a real run, to see where the time goes:

    JAMBA_PROFILE_STEP=12 torchrun --nproc_per_node 2 train.py ...

Each rank writes `<run_dir>/profile/step<N>_rank<r>.json` (a Chrome trace: open it in https://ui.perfetto.dev)
and logs the step's top device kernels, the share of the step the device was busy, and on CUDA the host
synchronisations of the step with the Python lines that caused them (`torch.cuda.set_sync_debug_mode`).
An environment variable rather than a config key: it is a diagnosis, not part of a run's recipe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
ENV = "JAMBA_PROFILE_STEP"


def profile_step() -> Optional[int]:
    """The step (1-based, as logged) named by JAMBA_PROFILE_STEP, if any."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV}={value!r}: give a step number >= 1 (e.g. {ENV}=12; after compilation and warm-up)")
    return int(value)


@contextlib.contextmanager
def profiled(out_dir: Path, step: int, rank: int, device: torch.device):
    """Profile the body (one training step); write the trace and log the summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, profile(activities=acts) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / f"step{step}_rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20)
    kernel_us = sum(e.device_time for e in prof.events()
                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) if cuda else 0.0
    syncs = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message).lower())
    lines = [f"profile of step {step} on rank {rank}: {wall * 1e3:.1f} ms wall; trace {trace}"]
    if cuda:
        lines.append(f"device kernels {kernel_us / 1e3:.1f} ms = {kernel_us / 1e4 / wall:.0f}% of the wall time "
                     f"(streams overlap: NCCL kernels count too)")
        lines.append(f"host syncs: {sum(syncs.values())}" + "".join(f"\n  {n} x {where}"
                                                                     for where, n in syncs.most_common(10)))
    log.info("%s\n%s", "\n".join(lines), table)
