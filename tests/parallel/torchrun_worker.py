"""Run a worker script of this folder under torchrun (gloo on CPU) and load what its rank 0 saved."""

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def run_worker(script: str, nproc: int, out: Path, *args: str, timeout: float) -> dict:
    """`torchrun --standalone --nproc_per_node nproc HERE/script out=OUT ARGS...`; one thread per rank. A failure
    raises with the command and the end of its stderr (where the failing rank's traceback is)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), f"out={out}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return torch.load(out)
