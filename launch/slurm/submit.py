"""Build a SlurmJob from YAML + `key=value` overrides (typed, like Hydra), then submit it or dry-run it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.slurm.render import SlurmJob, render_sbatch, resolved_paths, sbatch_options

DRY_RUN_JOB_ID = "1234"


def load_job(overrides: Sequence[str] = (), config: str | os.PathLike | None = None) -> SlurmJob:
    """SlurmJob defaults <- YAML file (optional) <- `key=value` overrides; wrong keys or types raise ValueError."""
    schema = OmegaConf.structured(SlurmJob)
    # YAML 1.1 reads 12:00:00 as the base-60 integer 43200, which SLURM would take as minutes: `time`
    # is taken as the literal text, from the command line and from the YAML file.
    overrides = list(overrides)
    time_text = [o.split("=", 1)[1] for o in overrides if o.startswith("time=")]
    overrides = [o for o in overrides if not o.startswith("time=")]
    try:
        merged = [schema]
        if config is not None:
            merged.append(load_config_file(config))
            raw = yaml.load(Path(config).read_text(), Loader=yaml.BaseLoader) or {}
            if isinstance(raw, dict) and "time" in raw:
                time_text.insert(0, str(raw["time"]))
        merged.append(OmegaConf.from_dotlist(overrides))
        if time_text:
            merged.append({"time": time_text[-1]})
        cfg = OmegaConf.merge(*merged)
    except OmegaConfBaseException as e:
        fields = ", ".join(SlurmJob.__dataclass_fields__)
        raise ValueError(f"bad SLURM job setting: {e}\nvalid keys: {fields}\n"
                         "(train.py overrides go after `--`)") from None
    return OmegaConf.to_object(cfg)


def load_config_file(config: str | os.PathLike):
    """The --config YAML file; a missing, unreadable or malformed one is one line (ValueError), not a traceback."""
    try:
        return OmegaConf.load(config)
    except OSError as e:
        raise ValueError(f"--config {config}: {e.strerror or e}; pass an existing YAML file of SlurmJob keys") from None
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"--config {config} is not valid YAML: {reason}") from None


def write_script(job: SlurmJob, log_dir: Path) -> Path:
    """Render into <log_dir>/<job_name>-<UTC time>.sbatch (kept: it is what ran)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job.job_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.sbatch"
    path.write_text(render_sbatch(job))
    return path


def submit(job: SlurmJob, sbatch: str = "sbatch") -> str:
    """Render, write and `sbatch` the job; returns the job id."""
    if shutil.which(sbatch) is None:  # before writing anything
        raise ValueError(f"sbatch not found ({sbatch!r} is not an executable on PATH): submit from a SLURM login "
                         "node, pass --sbatch /path/to/sbatch, or use --dry-run to see the job without submitting")
    paths = resolved_paths(job)
    script = write_script(job, paths["log_dir"])
    if paths["run_dir"].exists():
        print(f"run dir {paths['run_dir']} exists: the job resumes from its newest checkpoint")
    try:
        out = subprocess.run([sbatch, "--parsable", str(script)], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        reason = " ".join((e.stderr or e.stdout or "").split())[:500]
        raise RuntimeError(f"sbatch refused the job (exit {e.returncode}): {reason}; the script is {script}") from None
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted job {job_id} ({job.nodes} x {job.gpus_per_node} GPUs): script {script}\n"
          f"  log     {paths['log_dir']}/{job.job_name}-{job_id}.out\n"
          f"  run dir {paths['run_dir']}")
    return job_id


def dry_run(job: SlurmJob, out=None) -> str:
    """Print the exact script, the submit command, and (by running the script's own dry-run branch) the
    environment and srun/torchrun command for N nodes x G GPUs. Submits and starts nothing."""
    paths = resolved_paths(job)
    script = render_sbatch(job)
    # The script runs here (for the environment and command it prints) without the job's `setup` lines:
    # those are meant for the nodes (`module load`, activating a venv, ...) and must not run on this machine.
    local_script = render_sbatch(replace(job, setup=[]))
    hosts = [f"node{i:03d}" for i in range(1, job.nodes + 1)]
    text = [f"# ===== sbatch script ({job.nodes} node(s) x {job.gpus_per_node} GPUs) =====", script.rstrip("\n"),
            "# ===== submit =====",
            f"sbatch --parsable {paths['log_dir']}/{job.job_name}-<UTC time>.sbatch",
            "#   same as: sbatch " + " ".join(shlex.quote(o) for o in sbatch_options(job, paths["log_dir"]))
            + " <script>",
            f"# ===== inside the job (shown for job id {DRY_RUN_JOB_ID} on hosts {','.join(hosts)}) ====="]
    env = dict(os.environ, DRY_RUN="1", DRY_RUN_HEAD_NODE=hosts[0], SLURM_JOB_ID=DRY_RUN_JOB_ID,
               SLURM_JOB_NAME=job.job_name, SLURM_JOB_NUM_NODES=str(job.nodes), SLURM_NNODES=str(job.nodes),
               SLURM_JOB_NODELIST=",".join(hosts), SLURM_GPUS_ON_NODE=str(job.gpus_per_node),
               SLURM_SUBMIT_DIR=str(Path.cwd()))
    env.pop("SLURM_RESTART_COUNT", None)
    if job.cpus_per_task is not None:
        env["SLURM_CPUS_PER_TASK"] = str(job.cpus_per_task)
    else:
        env.pop("SLURM_CPUS_PER_TASK", None)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(local_script)
    try:
        res = subprocess.run(["bash", f.name], env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"the rendered script's dry run failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    text.append(res.stdout.rstrip("\n"))
    notes = res.stderr.strip().splitlines()
    if job.setup:
        notes.append(f"the {len(job.setup)} setup line(s) were not run here; on the nodes they run first and may "
                     "change the environment and the python above")
    if notes:
        text.append("# notes:\n" + "\n".join("#   " + line for line in notes))
    if job.cpus_per_task is None:
        text.append("# (OMP_NUM_THREADS above is from this machine's CPUs; on the nodes it is their CPUs / "
                    f"{job.gpus_per_node} unless cpus_per_task or OMP_NUM_THREADS is set)")
    joined = "\n".join(text) + "\n"
    (out or sys.stdout).write(joined)
    return joined
