"""Stand-in for train.py in launcher tests: joins the process group, all-reduces, records what it saw.

Writes <out_dir>/rank<RANK>.json with the torchrun environment and the all-reduced sum of ranks.
Usage: python dist_probe.py out_dir=<dir> [fail_rank=<r>] (fail_rank: that rank exits 3 on its first attempt)
"""

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out_dir = args["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    import faulthandler
    faulthandler.dump_traceback_later(20, exit=True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.get("fail_rank") == str(rank) and restart == 0:
        sys.exit(3)
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS", "NCCL_NVLS_ENABLE",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"]
    record = {k: os.environ.get(k) for k in keys}
    record.update(sum=total.item(), world=world, argv=sys.argv[1:])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
