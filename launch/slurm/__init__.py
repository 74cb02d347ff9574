"""SLURM launching: render launch/slurm/train.sbatch from a typed config and submit it.

    python -m launch.slurm submit nodes=2 gpus_per_node=8 partition=gpu account=abc time=24:00:00 \\
        job_name=small-2n -- experiment=gpu_small
    python -m launch.slurm submit --dry-run ...   # print script, commands and environment; submit nothing
"""

from launch.slurm.render import SlurmJob, render_sbatch, sbatch_options, time_limit_seconds, validate
from launch.slurm.submit import dry_run, load_job, submit

__all__ = ["SlurmJob", "render_sbatch", "sbatch_options", "time_limit_seconds", "validate",
           "load_job", "submit", "dry_run"]
