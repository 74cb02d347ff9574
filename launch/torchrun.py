"""`torchrun` with a configurable worker shutdown timeout on torch versions that lack `--shutdown-timeout`.

When torchrun is signalled (SIGUSR1 before the SLURM time limit, SIGTERM on preemption) it forwards the signal
to the workers, which checkpoint and exit, and SIGKILLs them after a timeout. torch >= 2.12 takes
`--shutdown-timeout`; older versions (e.g. 2.11) hard-code 30 s, too short to save a large model. This wrapper
sets that default from $TORCH_ELASTIC_SHUTDOWN_TIMEOUT, then runs torchrun unchanged:

    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240 python -m launch.torchrun --nnodes=2 ... train.py ...

launch/slurm/train.sbatch uses it only when `torchrun --help` has no --shutdown-timeout.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def patch_shutdown_timeout(seconds: int) -> bool:
    """Make `PContext.close(death_sig)` wait `seconds` before SIGKILL; False if this torch has no such default."""
    from torch.distributed.elastic.multiprocessing import api

    close = getattr(api.PContext, "close", None)
    defaults = getattr(close, "__defaults__", None)
    if not defaults or close.__code__.co_varnames[:3] != ("self", "death_sig", "timeout"):
        return False
    close.__defaults__ = (*defaults[:-1], seconds)
    return True


def main() -> None:
    seconds = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    if not patch_shutdown_timeout(seconds):
        print(f"launch.torchrun: cannot set the shutdown timeout on this torch; workers get torchrun's default",
              file=sys.stderr)
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
