"""python -m launch.slurm {submit,render} [--config job.yaml] [--dry-run] [key=value ...] [-- train.py overrides]

    # 2 nodes x 8 GPUs, 24 h; requeues itself at the time limit and resumes in runs/small-2n
    python -m launch.slurm submit job_name=small-2n nodes=2 gpus_per_node=8 partition=gpu account=abc \\
        time=24:00:00 -- experiment=gpu_small
    # print the script, the sbatch command, the environment and the per-node torchrun command
    python -m launch.slurm submit --dry-run nodes=4 gpus_per_node=8 -- experiment=gpu_small
    # just the script
    python -m launch.slurm render nodes=2 -- experiment=gpu_small > job.sbatch

`submit` (also with --dry-run) first checks the training config for the job's world size (nodes x
gpus_per_node) with trainer/preflight.py, as train.py would: a bad override is one line and exit code 2,
and nothing is submitted. `--no-check` skips that (e.g. data paths that only the compute nodes see).

Keys (see launch/slurm/render.py SlurmJob): job_name nodes gpus_per_node cpus_per_task mem time partition
account qos constraint exclusive signal_lead_s shutdown_timeout_s max_restarts max_requeues rdzv_port rdzv_conf run_dir
runs_root log_dir repo_dir python setup env extra_sbatch train_args, e.g. env.NCCL_SOCKET_IFNAME=ib0
'extra_sbatch=[--mail-type=END,--reservation=big]' 'setup=[source .venv/bin/activate]'.
"""

from __future__ import annotations

import argparse
import sys

from launch.slurm.render import render_sbatch, validate
from launch.slurm.submit import dry_run, load_job, submit


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["submit", "render"])
    parser.add_argument("--config", help="YAML file with SlurmJob keys (overrides on the command line win)")
    parser.add_argument("--dry-run", action="store_true", help="print everything, submit nothing")
    parser.add_argument("--sbatch", default="sbatch", help="sbatch executable (default: sbatch)")
    parser.add_argument("--no-check", action="store_true",
                        help="submit without checking the train.py overrides first (trainer/preflight.py)")
    parser.add_argument("overrides", nargs="*", help="key=value settings of the job")
    args = parser.parse_intermixed_args(argv)
    try:
        job = load_job(args.overrides, args.config)
        if train_args:
            job.train_args = list(job.train_args) + train_args
        validate(job)  # before the training-config check, which would misreport e.g. nodes=0 as WORLD_SIZE(0)
        if args.command == "submit" and not args.no_check:
            check_training_config(job)
        if args.command == "render":
            sys.stdout.write(render_sbatch(job))
        elif args.dry_run:
            dry_run(job)
        else:
            submit(job, sbatch=args.sbatch)
    except ValueError as e:  # includes jamba.config.ConfigError from the training-config check
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # sbatch refused the job
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check_training_config(job) -> None:
    """The train.py overrides must compose and validate for nodes x gpus_per_node ranks (one line if not)."""
    from trainer.preflight import check_command

    check_command(list(job.train_args), world_size=job.nodes * job.gpus_per_node)


if __name__ == "__main__":
    sys.exit(main())
