"""Run a worker script of this folder under torchrun (gloo on CPU) and load what its rank 0 saved; compare a
layout's run with the single-process reference."""

import os
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch

from tests.envs import pythonpath
from tests.process_tree import run_tree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def run_worker(script: str, nproc: int, out: Path, *args: str, timeout: float) -> dict:
    """`torchrun --standalone --nproc_per_node nproc HERE/script out=OUT ARGS...`; one thread per rank. A failure
    raises with the command and the end of its stderr (where the failing rank's traceback is)."""
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT) prints where its threads were
    env = {**os.environ, "PYTHONPATH": pythonpath(HERE), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), f"out={out}", *args]
    proc = run_tree(cmd, cwd=ROOT, env=env, timeout=timeout)  # a timeout takes the ranks down too
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return torch.load(out)


def rel(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    """Relative difference, ||a - b|| / max(||b||, floor)."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def check_matches(spec: str, got: dict, ref: dict, tol: float, floor: float) -> None:
    """A parallel layout's run against one process: every step's loss, every gradient after the first backward
    and every parameter after the last step, each within `tol` relative."""
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) <= tol * abs(b), f"{spec} ({got['dims']}): step {step} loss {a} vs {b}"
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        err = rel(got["grads"][name], g, floor)
        assert err <= tol, f"{spec}: gradient of {name} off by {err:.2e}"
    for name, p in ref["params"].items():
        err = rel(got["params"][name], p, floor)
        assert err <= tol, f"{spec}: {name} after 3 steps off by {err:.2e}"


# ---- the worker side -------------------------------------------------------------------------------
def init_worker(argv) -> Tuple[Dict[str, str], torch.device]:
    """A worker's `key=value` arguments and device, its process group started: gloo on CPU; with device=cuda
    NCCL on LOCAL_RANK's GPU, TF32 off (the comparisons are in fp32 there). One CPU thread per rank."""
    import torch.distributed as dist

    args = dict(a.split("=", 1) for a in argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.get("device") == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return args, device


def finish_worker(result: dict, out: str) -> None:
    """Rank 0 saves the result (what run_worker loads); every rank waits for it, then leaves the group."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
