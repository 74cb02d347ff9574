#!/usr/bin/env bash
# Train on several machines: run this same command on every node; torchrun's c10d rendezvous on the
# master address joins them (no node ranks to hand out; a restarted node rejoins by itself).
#
#   launch/multi_node.sh [-N NNODES] [-n NPROC] [--master-addr HOST] [--master-port PORT]
#                        [--hosts h1,h2,...] [--rdzv-id ID] [--rdzv-conf K=V,...] [-r MAX_RESTARTS] [--dry-run]
#                        [--] [train.py overrides ...]
#
#   -N, --nnodes N        nodes (or MIN:MAX for an elastic range: a restart after a lost node continues on the
#                         nodes left, the checkpoint and the data readers moved to them); default $NNODES, else
#                         the number of --hosts
#   -n, --nproc-per-node  processes per node (default: GPUs that nvidia-smi lists, else 1)
#   --master-addr HOST    rendezvous host; default $MASTER_ADDR, else the first of --hosts / $HOSTS
#   --master-port PORT    rendezvous port; default $MASTER_PORT, else 29500
#   --hosts h1,h2,...     the job's hosts (default $HOSTS); the first one hosts the rendezvous
#   --rdzv-id ID          the same on every node of one job; default $RDZV_ID, else "jamba"
#   --rdzv-conf K=V,...   torchrun's rendezvous settings (default $RDZV_CONF; '' for torchrun's own), e.g. last_call_timeout=10: with
#                         -N MIN:MAX, once MIN nodes joined torchrun waits this long (default 30 s) for more,
#                         at the start and at every restart; join_timeout=SECONDS bounds the wait for MIN nodes
#   -r, --max-restarts N  restart failed workers up to N times; they resume from the newest checkpoint
#   --dry-run             print the environment and the command, start nothing
#
# Example (2 nodes x 8 GPUs; run on both):
#   launch/multi_node.sh --hosts node01,node02 -n 8 experiment=gpu_small hydra.run.dir=/shared/runs/small
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/env.sh
source "$repo_dir/launch/env.sh"

nnodes="${NNODES:-}"
nproc=""
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
hosts="${HOSTS:-}"
rdzv_id="${RDZV_ID:-jamba}"
rdzv_conf="${RDZV_CONF:-}"
max_restarts=0
dry_run=0
while (( $# )); do
  case "$1" in
    -N|--nnodes) nnodes="${2:?$1 needs a value}"; shift 2 ;;
    --nnodes=*) nnodes="${1#*=}"; shift ;;
    -n|--nproc-per-node) nproc="${2:?$1 needs a value}"; shift 2 ;;
    --nproc-per-node=*) nproc="${1#*=}"; shift ;;
    --master-addr) master_addr="${2:?$1 needs a value}"; shift 2 ;;
    --master-addr=*) master_addr="${1#*=}"; shift ;;
    --master-port) master_port="${2:?$1 needs a value}"; shift 2 ;;
    --master-port=*) master_port="${1#*=}"; shift ;;
    --hosts) hosts="${2:?$1 needs a value}"; shift 2 ;;
    --hosts=*) hosts="${1#*=}"; shift ;;
    --rdzv-id) rdzv_id="${2:?$1 needs a value}"; shift 2 ;;
    --rdzv-id=*) rdzv_id="${1#*=}"; shift ;;
    --rdzv-conf) rdzv_conf="${2?$1 needs a value (an empty one: the torchrun defaults)}"; shift 2 ;;
    --rdzv-conf=*) rdzv_conf="${1#*=}"; shift ;;
    -r|--max-restarts) max_restarts="${2:?$1 needs a value}"; shift 2 ;;
    --max-restarts=*) max_restarts="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

fail() { echo "multi_node.sh: $*" >&2; exit 2; }

host_list=()
if [[ -n "$hosts" ]]; then
  IFS=', ' read -r -a host_list <<< "$hosts"
fi
if [[ -z "$master_addr" ]]; then
  (( ${#host_list[@]} )) || fail "no rendezvous host: pass --master-addr HOST, set MASTER_ADDR, or pass --hosts h1,h2,..."
  master_addr="${host_list[0]}"
fi
if [[ -z "$nnodes" ]]; then
  (( ${#host_list[@]} )) || fail "number of nodes unknown: pass -N/--nnodes N (or MIN:MAX), set NNODES, or pass --hosts"
  nnodes="${#host_list[@]}"
fi
[[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || fail "--nnodes must be N or MIN:MAX, got '$nnodes'"
(( ${nnodes%%:*} <= ${nnodes##*:} )) || fail "--nnodes MIN:MAX needs MIN <= MAX, got '$nnodes'"
[[ "$master_port" =~ ^[0-9]+$ ]] || fail "--master-port must be a port number, got '$master_port'"
[[ -z "$rdzv_conf" || "$rdzv_conf" =~ ^[A-Za-z_]+=[^,=[:space:]]+(,[A-Za-z_]+=[^,=[:space:]]+)*$ ]] ||
  fail "--rdzv-conf must be KEY=VALUE[,KEY=VALUE...] (e.g. last_call_timeout=10), got '$rdzv_conf'"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || fail "--max-restarts must be a non-negative integer, got '$max_restarts'"
if [[ -z "$nproc" ]]; then
  nproc=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    (( gpus > 0 )) && nproc="$gpus"
  fi
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || fail "--nproc-per-node must be a positive integer, got '$nproc'"

jamba_launch_env "$nproc"
# torchrun through launch/torchrun.py: on a signal it exits 75 when every worker checkpointed, without a traceback.
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"

cmd=("${PYTHON:-python}" -m launch.torchrun
  --nnodes="$nnodes"
  --nproc-per-node="$nproc"
  --rdzv-backend=c10d
  --rdzv-endpoint="$master_addr:$master_port"
  --rdzv-id="$rdzv_id"
  ${rdzv_conf:+--rdzv-conf="$rdzv_conf"}
  --max-restarts="$max_restarts"
  "${TRAIN_SCRIPT:-$repo_dir/train.py}" "$@")

if (( dry_run )); then
  echo "# environment"
  jamba_print_env
  echo "# command (the same on every node)"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# Check the training config for this world size before torchrun starts: a bad override is one line and exit
# code 2 here, instead of an error per rank plus torchrun's failure report (trainer/preflight.py).
# An elastic range (MIN:MAX) is checked for every node count in it: torchrun may (re)start with any of them.
if [[ -z "${TRAIN_SCRIPT:-}" ]]; then
  worlds="$(( ${nnodes##*:} * nproc ))"
  if [[ "$nnodes" == *:* ]]; then
    worlds=""
    for (( n = ${nnodes%%:*}; n <= ${nnodes##*:}; n++ )); do worlds+="${worlds:+,}$(( n * nproc ))"; done
  fi
  PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -m trainer.preflight \
    --world-size "$worlds" --local-procs "$nproc" -- "$@" || exit $?
  export JAMBA_PREFLIGHT_DONE=1  # train.py checks again, without repeating the warnings printed here
fi
exec "${cmd[@]}"
