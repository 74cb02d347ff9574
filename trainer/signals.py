"""Signals that stop a run cleanly, and what a rank does when its launcher dies. Standard library only:
train.py installs handlers for the default signals in its first lines, before Hydra, the command line's check
and torch are imported (`catch_early`), then hands over to the configured ones (`hand_over`), so a signal during
start-up (imports, the check, model build, resume) is not lost.

Saving signals (checkpoint.signals; default SIGTERM, SIGINT, SIGUSR1): the trainer finishes its step, every
rank agrees, saves and exits 75. Schedulers and terminals signal the whole process group (torchrun's
shutdown, SLURM, Kubernetes, Ctrl-C); the DataLoader workers ignore these signals (data/workers.py) so that
only the trainer acts on them. A second SIGINT (Ctrl-C twice) aborts at once, without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Iterable, Optional

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code after a signal-triggered checkpoint (EX_TEMPFAIL): requeue; re-running the command resumes."""

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
"""checkpoint.signals' default (trainer.config), and the signals train.py catches before it has read the config."""


class StopSignal:
    """Remembers the first of the given signals; the loop checks it (agreed across ranks) after each step."""

    def __init__(self, names: Iterable[str]):
        self.received: Optional[str] = None
        self._previous = {}
        for name in names:
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                log.warning("cannot install a %s handler outside the main thread", name)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # The next Ctrl-C gets the default action (the process dies of SIGINT at once), even while this
            # process is blocked in C++ where no Python handler runs.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.received is None:
            self.received = name
            log.warning("got %s: checkpointing after this step, then exiting with code %d%s", name,
                        EXIT_PREEMPTED, " (Ctrl-C again to abort without a checkpoint)" if name == "SIGINT" else "")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


# ---- train.py's first lines: signals before the config is read ---------------------------------------------
_early: Optional[StopSignal] = None

# Hydra flags under which train.py trains nothing here (a sweep's submitter pickles main() to other processes or
# SLURM jobs; --cfg/--help print and exit): they keep the default signal actions.
NOT_A_RUN = frozenset({"-m", "--multirun", "-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info", "-sc",
                       "--shell-completion"})


def catch_early(argv: Iterable[str]) -> None:
    """Catch the default signals from train.py's first lines (before Hydra, the command line's check and torch
    are imported: seconds), for a plain run; `hand_over` passes them on to the configured ones."""
    global _early
    argv = list(argv)
    if _early is None and not (NOT_A_RUN & set(argv)) and "hydra.mode=MULTIRUN" not in argv:
        _early = StopSignal(DEFAULT_SIGNALS)


def early_signal() -> Optional[str]:
    """The signal caught since train.py's first lines and not yet handed over, if any."""
    return _early.received if _early is not None else None


def hand_over(names: Iterable[str]) -> StopSignal:
    """A StopSignal for the configured `names`, replacing the early handlers (once; later calls, e.g. the next
    job of a sweep in this process, only install `names`). A signal already received carries over when the
    config saves on it; otherwise it now gets the action it would have had without the early handler (the
    process dies of it; SIGINT raises KeyboardInterrupt). A carried SIGINT leaves SIGINT at its default action:
    the next Ctrl-C aborts at once, as after a first Ctrl-C during training."""
    global _early
    names = list(names)
    early, _early = _early, None
    received = None
    if early is not None:
        received, early.received = early.received, None
        early.restore()
    stop = StopSignal(names)
    if received is not None:
        if received in names:
            stop.received = received
            if received == "SIGINT":
                signal.signal(signal.SIGINT, signal.SIG_DFL)
        else:
            os.kill(os.getpid(), getattr(signal, received))
    return stop


def watch_launcher(grace_s: float, interval_s: float = 1.0) -> Optional[threading.Thread]:
    """Under torchrun: when the launcher (this process's parent) dies, e.g. kill -9 of the agent, stop.

    Without this the ranks train on alone, their output going nowhere. A daemon thread polls the parent pid
    (a thread keeps running while the main thread waits in a collective); when it changes, the process
    sends itself SIGTERM (checkpoint after this step, exit 75), then SIGKILL if still alive `grace_s` later
    (e.g. blocked in a collective with a peer that died with the agent). Polling rather than
    PR_SET_PDEATHSIG: that fires when the launching *thread* exits, which need not be the launcher's death."""
    parent = os.getppid()
    if parent == 1:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.error("the launcher (pid %d) is gone: checkpointing after this step and exiting; killed in %.0f s "
                  "if still running", parent, grace_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        log.error("still running %.0f s after the launcher died: killing this rank", grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    t.start()
    return t
