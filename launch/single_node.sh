#!/usr/bin/env bash
# Train on one machine: one process per GPU, started by `torchrun --standalone`.
#
#   launch/single_node.sh [-n NPROC] [-r MAX_RESTARTS] [--dry-run] [--] [train.py overrides ...]
#
#   -n, --nproc-per-node N   processes (default: number of GPUs that nvidia-smi lists, else 1)
#   -r, --max-restarts N     torchrun restarts the workers up to N times after a failure; they resume
#                            from the newest checkpoint in the run directory (default 0)
#   --dry-run                print the environment and the command, start nothing (the config is not
#                            checked: `python -m trainer.preflight --world-size N -- OVERRIDES` does that)
#
# Everything else goes to train.py, e.g.
#   launch/single_node.sh -n 8 experiment=gpu_small hydra.run.dir=runs/small-8gpu
# Environment: PYTHON (default python), TRAIN_SCRIPT (default <repo>/train.py), and the defaults of
# launch/env.sh (OMP_NUM_THREADS, NCCL_*), which a value already set in the environment overrides.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/env.sh
source "$repo_dir/launch/env.sh"

nproc=""
max_restarts=0
dry_run=0
while (( $# )); do
  case "$1" in
    -n|--nproc-per-node) nproc="${2:?$1 needs a value}"; shift 2 ;;
    --nproc-per-node=*) nproc="${1#*=}"; shift ;;
    -r|--max-restarts) max_restarts="${2:?$1 needs a value}"; shift 2 ;;
    --max-restarts=*) max_restarts="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ -z "$nproc" ]]; then
  nproc=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    (( gpus > 0 )) && nproc="$gpus"
  fi
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "single_node.sh: --nproc-per-node must be a positive integer, got '$nproc'" >&2
  exit 2
fi
if ! [[ "$max_restarts" =~ ^[0-9]+$ ]]; then
  echo "single_node.sh: --max-restarts must be a non-negative integer, got '$max_restarts'" >&2
  exit 2
fi

jamba_launch_env "$nproc"
# torchrun through launch/torchrun.py: on a signal it exits 75 when every worker checkpointed, without a traceback.
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"

cmd=("${PYTHON:-python}" -m launch.torchrun
  --standalone
  --nnodes=1
  --nproc-per-node="$nproc"
  --max-restarts="$max_restarts"
  "${TRAIN_SCRIPT:-$repo_dir/train.py}" "$@")

if (( dry_run )); then
  echo "# environment"
  jamba_print_env
  echo "# command"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# Check the training config for this world size before torchrun starts: a bad override is one line and exit
# code 2 here, instead of an error per rank plus torchrun's failure report (trainer/preflight.py).
if [[ -z "${TRAIN_SCRIPT:-}" ]]; then
  PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m trainer.preflight \
    --world-size "$nproc" --local-procs "$nproc" -- "$@" || exit $?
  export JAMBA_PREFLIGHT_DONE=1  # train.py checks again, without repeating the warnings printed here
fi
exec "${cmd[@]}"
