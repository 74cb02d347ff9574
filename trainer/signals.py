"""Signals that stop a run cleanly, and what a rank does when its launcher dies. Standard library only:
train.py installs handlers for the default signals in its first lines, before Hydra, the command line's check
and torch are imported, then hands over to the configured ones (`StopSignal.hand_over`), so a signal during
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
        self._names = tuple(names)
        for name in self._names:
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

    def hand_over(self, names: Iterable[str]) -> "StopSignal":
        """Replace these handlers (installed before the config was read) by a StopSignal for the configured
        `names`. A signal already received carries over when the config saves on it; otherwise it now gets the
        action it would have had without the early handler (the process dies of it; SIGINT raises
        KeyboardInterrupt). Called again (the next job of a sweep in this process) it only installs `names`."""
        received, self.received = self.received, None
        self.restore()
        stop = StopSignal(names)
        if received is not None:
            if received in stop._names:
                stop.received = received
            else:
                os.kill(os.getpid(), getattr(signal, received))
        return stop

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


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
