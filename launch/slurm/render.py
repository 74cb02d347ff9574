"""Render launch/slurm/train.sbatch for one job from a typed config, so nobody edits a script by hand.

The template's body (everything after its `# ---- end of sbatch header ----` line) is kept verbatim;
the renderer writes the `#SBATCH` header and the parameter block above it:

    #!/bin/bash
    #SBATCH --job-name=...            <- SlurmJob fields
    ...
    # ---- end of sbatch header ----
    REPO_DIR=... RUN_DIR=... ...      <- parameters the body reads
    set -- experiment=gpu_small ...   <- train.py overrides
    <template body>
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

TEMPLATE = Path(__file__).with_name("train.sbatch")
REPO_ROOT = Path(__file__).resolve().parents[2]
HEADER_END = "# ---- end of sbatch header ----\n"


@dataclass
class SlurmJob:
    """One SLURM training job: N nodes x G GPUs, one torchrun per node, one rank per GPU."""

    job_name: str = "jamba"
    """SLURM job name; also names the run directory, so a requeued or resubmitted job of this name resumes it."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs per node = training processes per node."""
    cpus_per_task: Optional[int] = None
    """CPUs per node (the job runs one task per node); None = the cluster's default."""
    mem: Optional[str] = None
    """Memory per node, e.g. "0" (all of it) or "480G"; None = the cluster's default."""
    time: str = "24:00:00"
    """Time limit: MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    """Ask for whole nodes (`--exclusive`)."""
    signal_lead_s: int = 300
    """SLURM sends SIGUSR1 to the batch script this many seconds before the time limit."""
    shutdown_timeout_s: Optional[int] = None
    """Seconds the workers get to write their checkpoint after the signal; None = signal_lead_s - 60."""
    max_restarts: int = 0
    """torchrun restarts failed workers up to this many times per job; they resume from the last checkpoint."""
    max_requeues: int = 100
    """The batch script stops requeueing itself after this many requeues."""
    rdzv_port: Optional[int] = None
    """c10d rendezvous port on the first node; None = 29500 + job id % 1000 (jobs sharing a node differ)."""
    rdzv_conf: Optional[str] = None
    """torchrun's rendezvous settings, KEY=VALUE[,KEY=VALUE...] (`--rdzv-conf`), e.g. "join_timeout=1800" when
    nodes take longer than torchrun's 600 s to start; None = torchrun's defaults."""
    run_dir: Optional[str] = None
    """Run directory (checkpoints, metrics, wandb id); None = <runs_root>/<job_name>."""
    runs_root: str = "runs"
    log_dir: str = "logs/slurm"
    """Job logs: <log_dir>/<job_name>-<job id>.out (appended to across requeues), plus the rendered scripts."""
    repo_dir: Optional[str] = None
    """Checkout that holds train.py; None = this one."""
    python: str = "python"
    """Python that runs torchrun and train.py on the nodes."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run first, e.g. ["module load cuda/12.8", "source .venv/bin/activate"]."""
    env: Dict[str, str] = field(default_factory=dict)
    """Extra environment for every rank, e.g. {NCCL_SOCKET_IFNAME: "ib0"}."""
    extra_sbatch: List[str] = field(default_factory=list)
    """More sbatch options, each written as an #SBATCH line, e.g. ["--mail-type=END", "--reservation=big"]."""
    train_args: List[str] = field(default_factory=list)
    """train.py Hydra overrides, e.g. ["experiment=gpu_small", "optim.lr=3e-4"]."""


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RDZV_CONF_RE = re.compile(r"^[A-Za-z_]+=[^,=\s]+(,[A-Za-z_]+=[^,=\s]+)*$")  # as launch/multi_node.sh checks it


def time_limit_seconds(value: str) -> int:
    """Seconds in a SLURM time limit ("30", "1:30:00", "2-00", "1-12:00", "1-12:00:00", "90:00")."""
    m = _TIME_RE.match(value.strip())
    if not m:
        raise ValueError(f"time={value!r} is not a SLURM time limit; use MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mnt, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mnt) * 60 + s
    if len(parts) == 1:  # MM
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]  # HH:MM:SS


def validate(job: SlurmJob) -> None:
    """Raise ValueError naming the field, its value and the fix."""
    if not _NAME_RE.match(job.job_name):
        raise ValueError(f"job_name={job.job_name!r}: use letters, digits, '.', '_', '-' (it names the run directory)")
    for key in ("nodes", "gpus_per_node"):
        if getattr(job, key) < 1:
            raise ValueError(f"{key}={getattr(job, key)} must be >= 1")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise ValueError(f"cpus_per_task={job.cpus_per_task} must be >= 1 or null")
    for key in ("max_restarts", "max_requeues"):
        if getattr(job, key) < 0:
            raise ValueError(f"{key}={getattr(job, key)} must be >= 0")
    limit = time_limit_seconds(job.time)
    if job.signal_lead_s < 60:
        raise ValueError(f"signal_lead_s={job.signal_lead_s}: give the job at least 60 s to checkpoint and requeue")
    if job.signal_lead_s >= limit:
        raise ValueError(f"signal_lead_s={job.signal_lead_s} is not shorter than time={job.time} ({limit} s); "
                         "raise time or lower signal_lead_s")
    shutdown = shutdown_timeout(job)
    if not 0 < shutdown < job.signal_lead_s:
        raise ValueError(f"shutdown_timeout_s={shutdown} must be > 0 and < signal_lead_s={job.signal_lead_s} "
                         "(the requeue must happen before the time limit)")
    if job.rdzv_port is not None and not 1024 <= job.rdzv_port <= 65535:
        raise ValueError(f"rdzv_port={job.rdzv_port} must be in 1024..65535 (or null: 29500 + job id % 1000)")
    if job.rdzv_conf is not None and not _RDZV_CONF_RE.match(job.rdzv_conf):
        raise ValueError(f"rdzv_conf={job.rdzv_conf!r} must be KEY=VALUE[,KEY=VALUE...] (e.g. join_timeout=1800) "
                         "or null")
    for opt in job.extra_sbatch:
        if not opt.startswith("-"):
            raise ValueError(f"extra_sbatch item {opt!r} must be an sbatch option such as '--mail-type=END'")
    for key in job.env:
        if not _ENV_RE.match(key):
            raise ValueError(f"env key {key!r} is not a valid environment variable name")


def shutdown_timeout(job: SlurmJob) -> int:
    return job.shutdown_timeout_s if job.shutdown_timeout_s is not None else job.signal_lead_s - 60


def resolved_paths(job: SlurmJob, cwd: Path | None = None) -> dict[str, Path]:
    """Absolute repo, run and log directories (relative ones are taken from `cwd`, default the current one)."""
    cwd = Path.cwd() if cwd is None else cwd
    repo = Path(job.repo_dir).expanduser() if job.repo_dir else REPO_ROOT
    repo = repo if repo.is_absolute() else cwd / repo
    run = Path(job.run_dir).expanduser() if job.run_dir else Path(job.runs_root).expanduser() / job.job_name
    log = Path(job.log_dir).expanduser()
    return {
        "repo_dir": repo,
        "run_dir": run if run.is_absolute() else cwd / run,
        "log_dir": log if log.is_absolute() else cwd / log,
    }


def sbatch_options(job: SlurmJob, log_dir: Path) -> list[str]:
    """The job's sbatch options, in the order they appear as #SBATCH lines."""
    opts = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
            f"--gpus-per-node={job.gpus_per_node}"]
    if job.cpus_per_task is not None:
        opts.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.mem is not None:
        opts.append(f"--mem={job.mem}")
    opts.append(f"--time={job.time}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(job, key):
            opts.append(f"--{key}={getattr(job, key)}")
    if job.exclusive:
        opts.append("--exclusive")
    opts += [f"--signal=B:USR1@{job.signal_lead_s}", "--requeue", "--open-mode=append",
             f"--output={log_dir}/%x-%j.out"]
    return opts + list(job.extra_sbatch)


def template_body() -> str:
    text = TEMPLATE.read_text()
    if HEADER_END not in text:
        raise RuntimeError(f"{TEMPLATE} lost its {HEADER_END.strip()!r} line")
    return text.split(HEADER_END, 1)[1]


def render_sbatch(job: SlurmJob, cwd: Path | None = None) -> str:
    """The complete sbatch script for `job`."""
    validate(job)
    paths = resolved_paths(job, cwd)
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# Rendered by `python -m launch.slurm` from {TEMPLATE.name}: {job.nodes} node(s) x "
             f"{job.gpus_per_node} GPUs. Change the config and render again rather than editing this file."]
    lines += [f"#SBATCH {opt}" for opt in sbatch_options(job, paths["log_dir"])]
    lines.append(HEADER_END.rstrip("\n"))
    lines.append("# ---- rendered parameters ----")
    params = {
        "REPO_DIR": str(paths["repo_dir"]),
        "RUN_DIR": str(paths["run_dir"]),
        "PROCS_PER_NODE": str(job.gpus_per_node),
        "MAX_RESTARTS": str(job.max_restarts),
        "MAX_REQUEUES": str(job.max_requeues),
        "SHUTDOWN_TIMEOUT": str(shutdown_timeout(job)),
        "PYTHON": job.python,
    }
    # always set, also when null (empty: the script's default), so a value the submitter happens to have exported
    # (sbatch passes its environment on) cannot reach the job unchecked
    params["RDZV_PORT"] = "" if job.rdzv_port is None else str(job.rdzv_port)
    params["RDZV_CONF"] = job.rdzv_conf or ""
    lines += [f"{k}={q(v)}" for k, v in params.items()]
    lines += [f"export {k}={q(str(v))}" for k, v in job.env.items()]
    if job.setup:
        lines.append(f"cd {q(str(paths['repo_dir']))}")
        lines += list(job.setup)
    lines.append("set --" + "".join(" " + q(a) for a in job.train_args))
    return "\n".join(lines) + "\n" + template_body()
