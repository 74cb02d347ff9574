# shellcheck shell=bash
# Environment shared by every launcher in launch/ (sourced, not executed).
#
#   source launch/env.sh
#   jamba_launch_env <procs-per-node> [<cpus-on-this-node>]
#
# Every value is a default: a variable already set in the caller's environment wins.

jamba_launch_env() {
  local procs="${1:?usage: jamba_launch_env <procs-per-node> [<cpus>]}"
  local cpus="${2:-}"
  if [[ -z "$cpus" ]]; then
    cpus="$(nproc 2>/dev/null || echo 1)"
  fi
  local threads=$(( cpus / procs ))
  (( threads >= 1 )) || threads=1

  # NVLink multicast (NVLS / symmetric-memory multicast) stays off: on shared hosts a program using it
  # can take the machine's GPUs out of service, and FSDP's all-gathers and reduce-scatters do not need it.
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
  export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
  export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
  # CPU threads per rank: the node's cores split evenly over its ranks (torchrun would default to 1).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
  export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
  # Elastic restarts (--max-restarts): by default the rendezvous TCPStore is shared across restart rounds,
  # and restarted workers then read the previous round's stale process-group keys (gloo/NCCL "connection
  # refused" on restart, pytorch/pytorch#167288). A fresh store per round avoids that.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
  # NCCL says what went wrong, not everything it does (set NCCL_DEBUG=INFO to debug topology).
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Sequence-length curricula change activation shapes: expandable segments avoid fragmentation OOMs.
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  # Log lines reach the job's log file as they are written.
  export PYTHONUNBUFFERED=1
}

# Print the environment a launcher sets (for --dry-run), one `KEY=value` a line.
jamba_print_env() {
  local name
  for name in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS OMP_NUM_THREADS \
      MKL_NUM_THREADS TORCH_DISABLE_SHARE_RDZV_TCP_STORE NCCL_DEBUG PYTORCH_CUDA_ALLOC_CONF PYTHONUNBUFFERED; do
    printf '%s=%s\n' "$name" "${!name-}"
  done
}
