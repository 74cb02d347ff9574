"""`torchrun`, with two things the launchers in launch/ need:

1. A signalled torchrun (SIGTERM from SLURM/Kubernetes, Ctrl-C, SIGUSR1 with --signals-to-handle) forwards the
   signal to the workers, which checkpoint and exit 75, and then dies with a SignalException traceback and
   exit code 1. Here it says what happened in one line and exits 75 when every worker exited 75 (they saved:
   requeue / re-run to resume), else 128 + the signal number. Likewise when the workers stopped by
   themselves after a signal (exit 75 with no restarts left): 75, after torchrun's failure summary.
   Likewise when every failed worker exited 2 (a config error, e.g. a checkpoint that does not fit the model,
   or a usage error): a line pointing at their message and exit 2, instead of torchrun's traceback and
   failure summary (torchrun's own log lines about stopping the workers still come before it).
2. A configurable worker shutdown timeout on torch versions without `--shutdown-timeout` (< 2.12, which
   hard-code 30 s, too short to save a large model): from $TORCH_ELASTIC_SHUTDOWN_TIMEOUT when set.

    python -m launch.torchrun --standalone --nproc-per-node=8 train.py ...     # torchrun's arguments

launch/single_node.sh, launch/multi_node.sh and launch/slurm/train.sbatch run torchrun through this module.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Dict, List, Optional

EXIT_PREEMPTED = 75  # trainer.signals.EXIT_PREEMPTED (not imported: this runs without the trainer's deps)
EXIT_CONFIG_ERROR = 2  # trainer.preflight.EXIT_CONFIG_ERROR: the rank printed one line saying what to change
_exit_codes: Dict[int, Optional[int]] = {}  # local rank -> exit code, recorded when torchrun closes workers


def patch_shutdown_timeout(seconds: int) -> bool:
    """Make `PContext.close(death_sig)` wait `seconds` before SIGKILL; False if this torch has no such default."""
    from torch.distributed.elastic.multiprocessing import api

    close = getattr(api.PContext, "close", None)
    defaults = getattr(close, "__defaults__", None)
    if not defaults or close.__code__.co_varnames[:3] != ("self", "death_sig", "timeout"):
        return False
    close.__defaults__ = (*defaults[:-1], seconds)
    return True


def record_exit_codes() -> bool:
    """Wrap `PContext.close` to keep the workers' exit codes (subprocess workers, as torchrun starts them)."""
    from torch.distributed.elastic.multiprocessing import api

    close = getattr(api.PContext, "close", None)
    if close is None or getattr(close, "_records_exit_codes", False):
        return close is not None

    @functools.wraps(close)
    def recording_close(self, *args, **kwargs):
        try:
            return close(self, *args, **kwargs)
        finally:
            for rank, handler in (getattr(self, "subprocess_handlers", None) or {}).items():
                _exit_codes[int(rank)] = handler.proc.poll()

    recording_close._records_exit_codes = True
    api.PContext.close = recording_close
    return True


def config_error_ranks(exit_codes: Dict[int, int]) -> List[int]:
    """The failed ranks when every failure is a config or usage error (exit 2), else []. Workers that torchrun
    stopped because another failed end by its SIGTERM (or SIGKILL after the shutdown timeout) and do not count;
    any other death by signal (an OOM kill, a segfault, an abort) is a failure of its own."""
    stopped = (-signal.SIGTERM, -signal.SIGKILL)
    failed = {r: c for r, c in exit_codes.items() if c not in stopped}
    return sorted(failed) if failed and all(c == EXIT_CONFIG_ERROR for c in failed.values()) else []


def _codes() -> str:
    return ", ".join(f"local rank {r}: {c}" for r, c in sorted(_exit_codes.items())) or "none recorded"


def main() -> None:
    # A fresh rendezvous store per restart round: restarted workers must not read the dead round's keys
    # (pytorch/pytorch#167288; trainer/elastic.py covers a plain single-node torchrun).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    seconds = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    if seconds and not patch_shutdown_timeout(int(seconds)):
        print("launch.torchrun: cannot set the shutdown timeout on this torch; workers get torchrun's default",
              file=sys.stderr)
    record_exit_codes()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main()
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        if _exit_codes and all(c == EXIT_PREEMPTED for c in _exit_codes.values()):
            print(f"launch.torchrun: got {name}; every worker checkpointed and exited {EXIT_PREEMPTED}: re-run the "
                  f"same command to resume", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        print(f"launch.torchrun: got {name}; workers exited with ({_codes()}): not all of them checkpointed",
              file=sys.stderr)
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if codes and all(c == EXIT_PREEMPTED for c in codes):
            print(f"launch.torchrun: the workers checkpointed and exited {EXIT_PREEMPTED} (a signal reached them): "
                  f"re-run the same command to resume", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        ranks = config_error_ranks({r: f.exitcode for r, f in e.failures.items()})
        if ranks:
            # a config or usage problem the rank(s) already reported (train.py: one 'config error:' line; Python
            # or argparse: their usage message): torchrun's traceback and failure summary would bury it
            print(f"launch.torchrun: rank(s) {', '.join(map(str, ranks))} exited {EXIT_CONFIG_ERROR}, a "
                  f"config or usage error: see the message above", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        raise


if __name__ == "__main__":
    main()
