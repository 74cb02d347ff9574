"""Stand-in for train.py in the sweep test: a Hydra task that joins the process group of its sweep point.

Writes <job output dir>/rank<RANK>.json; for lr == preempt_lr, the first attempt exits with the trainer's
preemption code (as train.py does after a signal-triggered checkpoint) so the launcher requeues the job.
"""

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for `launch` and `trainer`


@hydra.main(config_path=".", config_name="probe", version_base=None)
def main(cfg) -> float:
    import torch
    import torch.distributed as dist

    from trainer.checkpoint import EXIT_PREEMPTED

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if cfg.preempt_lr == cfg.lr and restart == 0:
        dist.barrier()
        dist.destroy_process_group()
        sys.exit(EXIT_PREEMPTED)
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "NCCL_NVLS_ENABLE", "OMP_NUM_THREADS", "SLURM_JOB_ID"]
    record = {k: os.environ.get(k) for k in keys}
    record.update(sum=total.item(), world=world, lr=cfg.lr, restart=restart)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return cfg.lr


if __name__ == "__main__":
    main()
