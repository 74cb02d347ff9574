"""How long an asynchronous checkpoint stalls training while its state is staged to CPU memory, first save and
later ones, for our stager (trainer/checkpoint_staging.py) and torch's buffers (`_create_cpu_state_dict`).

The state is a model preset's parameters with two AdamW moments each, fp32 DTensors on one device (a
1-process mesh), the layout FSDP2's state dict has: for bench-3b 36 GB, what `train.py experiment=bench_3b`
checkpoints on one GPU. Each method: the first stage (allocate the buffers, pin them, copy), then `--repeats`
more stages into the same buffers (the copy alone). Host memory: the state once per method (released between).

    python -m launch.bench_staging --preset bench-3b                     # one GPU
    python -m launch.bench_staging --preset tiny --device cpu            # CPU smoke run (nothing pinned)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Dict, List

import torch

from launch.results import report_json


def make_state(preset: str, device: torch.device) -> Dict[str, Dict[str, torch.Tensor]]:
    """{"model": name -> DTensor, "optim": name.exp_avg / .exp_avg_sq -> DTensor}, fp32, random."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from jamba.config import get_preset
    from jamba.model import JambaForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in JambaForCausalLM(get_preset(preset)).named_parameters()}
    mesh = init_device_mesh(device.type, (1,))
    gen = torch.Generator(device=device).manual_seed(0)

    def dt(shape):
        return distribute_tensor(torch.randn(shape, device=device, generator=gen), mesh, [Replicate()])

    model = {n: dt(s) for n, s in shapes.items()}
    optim = {f"{n}.{m}": dt(s) for n, s in shapes.items() for m in ("exp_avg", "exp_avg_sq")}
    return {"model": model, "optim": optim}


def nbytes(state) -> int:
    return sum(t.to_local().numel() * t.element_size() for part in state.values() for t in part.values())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours(state, pin: bool, repeats: int) -> List[float]:
    from trainer.checkpoint_staging import ReusedBufferStager

    stager = ReusedBufferStager(pin_memory=pin)
    times = [timed(lambda: stager.stage(state)) for _ in range(1 + repeats)]
    stager.release()
    return times


def torchs(state, pin: bool, repeats: int) -> List[float]:
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

    buf = {}

    def stage():
        if not buf:
            buf["sd"] = _create_cpu_state_dict(state, pin_memory=pin)
        _copy_state_dict(state, buf["sd"], non_blocking=pin)
        if pin:
            torch.cuda.synchronize()

    times = [timed(stage) for _ in range(1 + repeats)]
    buf.clear()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default="ours,torch", help="comma-separated: ours, torch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch.distributed as dist

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    state = make_state(args.preset, device)
    size = nbytes(state)
    print(f"{args.preset}: {size / 1e9:.1f} GB of fp32 weights and AdamW moments on {device}", flush=True)
    pin = device.type == "cuda"
    results = {"preset": args.preset, "bytes": size, "device": str(device), "pinned": pin}
    for method in args.methods.split(","):
        fn = {"ours": ours, "torch": torchs}[method]
        secs = fn(state, pin, args.repeats)
        gc.collect()
        results[method] = {"first_s": secs[0], "later_s": secs[1:]}
        later = ", ".join(f"{s:.2f}" for s in secs[1:])
        print(f"{method:6s} first stage {secs[0]:7.2f} s ({size / secs[0] / 1e9:5.1f} GB/s), later {later} s",
              flush=True)
    report_json(results, args.json, echo=False)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
