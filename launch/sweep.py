"""Hydra sweeps on SLURM where every sweep point is one multi-GPU job (conf/hydra/launcher/slurm_gpu.yaml).

Hydra takes launchers only from the `hydra_plugins` namespace: hydra_plugins/jamba_launch re-exports the class.

Hydra's submitit launcher runs the task function once per SLURM task; we ask for one task per GPU, so each
task is one rank. `TorchSlurmLauncher` adds what train.py needs on top of it, inside each task:

- torchrun's environment from SLURM's: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK =
  SLURM_LOCALID, LOCAL_WORLD_SIZE = tasks per node, MASTER_ADDR = the job's first host, MASTER_PORT =
  29500 + job id % 1000 (or `master_port`); plus launch/env.sh's NCCL defaults (NVLink multicast off).
- preemption: SLURM sends SIGUSR1 to every rank `signal_delay_s` before the time limit (or SIGTERM when it
  preempts); the trainer checkpoints and exits with its preemption exit code; then global rank 0 runs
  `scontrol requeue`, and the requeued job re-runs the same sweep point in the same directory, which
  resumes from the checkpoint (and the same wandb run, whose id lives in that directory).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]



def trainer_preempt_exit_code() -> int:
    """The trainer's exit code after a signal-triggered checkpoint (trainer.checkpoint.EXIT_PREEMPTED)."""
    from trainer.checkpoint import EXIT_PREEMPTED

    return EXIT_PREEMPTED


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM host list -> host names ("gpu[01-03,07],cpu1" -> gpu01 gpu02 gpu03 gpu07 cpu1)."""
    hosts: list[str] = []
    depth, start = 0, 0
    groups = []
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            if i > start:
                groups.append(nodelist[start:i])
            start = i + 1
    for group in groups:
        if "[" not in group:
            hosts.append(group)
            continue
        prefix, rest = group.split("[", 1)
        ranges, suffix = rest.split("]", 1)
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
    return hosts


def torch_env_from_slurm(environ: Mapping[str, str], master_port: int | None = None) -> dict[str, str]:
    """torchrun-style variables for this SLURM task (one task per rank); {} outside a SLURM step."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    world = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    hosts = expand_hostlist(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "localhost")
    if master_port is None:
        master_port = 29500 + int(environ.get("SLURM_JOB_ID", "0")) % 1000
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, world // nodes)),
        "GROUP_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port),
    }


def launch_env_defaults(environ: Mapping[str, str], procs_per_node: int) -> dict[str, str]:
    """launch/env.sh's defaults for a rank (values already in `environ` win)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus = int(environ.get("SLURM_CPUS_PER_TASK", 0)) or max(1, cpus // max(1, procs_per_node))
    defaults = {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
        "OMP_NUM_THREADS": str(cpus),
        "MKL_NUM_THREADS": str(cpus),
        "NCCL_DEBUG": "WARN",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "PYTHONUNBUFFERED": "1",
    }
    return {k: v for k, v in defaults.items() if k not in environ}


def is_preempted_exit(exc: BaseException | None, preempt_exit_code: int) -> bool:
    """True when the trainer ended because it was told to checkpoint and stop (SIGUSR1/SIGTERM)."""
    if isinstance(exc, SystemExit):
        return exc.code == preempt_exit_code and preempt_exit_code != 0
    return bool(exc is not None and getattr(exc, "preempted", False))


def requeue_job(environ: MutableMapping[str, str] = os.environ) -> None:
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        log.warning("preempted outside SLURM: nothing to requeue")
        return
    log.warning("checkpoint written after preemption: requeueing SLURM job %s", job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=120)


class TorchSlurmLauncher(SlurmLauncher):
    """Hydra's submitit SLURM launcher with one rank per SLURM task and checkpoint-then-requeue on preemption."""

    def __init__(self, preempt_exit_code: int | None = None, master_port: int | None = None,
                 **params: Any) -> None:
        # The tasks unpickle this launcher (and import launch/, trainer/) from the checkout, wherever sbatch runs.
        setup = [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
        params["setup"] = setup + list(params.get("setup") or [])
        super().__init__(**params)
        self.preempt_exit_code = trainer_preempt_exit_code() if preempt_exit_code is None else int(preempt_exit_code)
        self.master_port = master_port

    def __call__(self, *args: Any, **kwargs: Any):  # runs inside each SLURM task
        env = torch_env_from_slurm(os.environ, self.master_port)
        os.environ.update(env)
        os.environ.update(launch_env_defaults(os.environ, int(env.get("LOCAL_WORLD_SIZE", "1"))))
        try:
            ret = super().__call__(*args, **kwargs)
        except SystemExit as e:
            if is_preempted_exit(e, self.preempt_exit_code):
                self._requeue_and_exit(e.code)
            raise
        failure = ret._return_value if getattr(ret, "status", None) is not None and ret.status.name == "FAILED" \
            else None
        if is_preempted_exit(failure, self.preempt_exit_code):
            self._requeue_and_exit(self.preempt_exit_code)
        return ret

    @staticmethod
    def _requeue_and_exit(code: int) -> None:
        # The checkpoint save is collective, so when rank 0 is here every rank has written its part.
        if os.environ.get("RANK", "0") == "0":
            requeue_job()
        # No result file: submitit keeps waiting for the requeued job instead of reporting a failure.
        sys.exit(code)
