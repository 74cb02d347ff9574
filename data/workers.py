"""What a DataLoader worker process does first: stay out of the trainer's signals, drop the sockets it
inherited, and die with the trainer.

- Signals: schedulers and terminals signal the whole process group (torchrun's shutdown with killpg, SLURM,
  Kubernetes, Ctrl-C). Those signals are for the trainer, which checkpoints and exits 75; a worker that dies
  of one makes the trainer fail with "DataLoader worker (pid N) is killed by signal". Workers ignore them.
  The trainer blocks them while it forks its workers (`fork_shielded`) and a worker unblocks them only after
  ignoring them, so none can arrive in between and hit the handler the worker inherited.
- Sockets: a worker forked after the process group exists holds copies of its gloo/NCCL bootstrap sockets
  and the TCPStore connection. An orphaned worker kept them open and a restarted rank connected to it
  (torchrun --max-restarts hung). Each inherited socket is replaced by /dev/null (dup2 rather than close,
  so its fd number is never reused under an object that still thinks it owns it).
- Death: PR_SET_PDEATHSIG(SIGKILL), so a worker goes when the trainer is killed (kill -9, OOM killer);
  a worker whose trainer died before that call exits at once. The trainer stops workers it no longer
  needs itself (they ignore SIGTERM): `kill_workers`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import stat
import sys
from typing import Iterable

SHIELDED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
                 if hasattr(signal, n))
_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def fork_shielded():
    """Block SHIELDED in this thread while workers fork: children inherit the blocked mask. A signal sent
    meanwhile is not lost: another thread of the trainer takes it, or it is delivered when this ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux: `sig` when the thread that forked this process exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def drop_inherited_sockets() -> int:
    """Point every open socket fd of this process at /dev/null; returns how many there were."""
    try:
        fds = [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:  # no procfs: nothing to do
        return 0
    devnull = os.open(os.devnull, os.O_RDWR)
    n = 0
    try:
        for fd in fds:
            if fd == devnull:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
                    n += 1
            except OSError:  # closed meanwhile (e.g. the fd listdir used)
                pass
    finally:
        os.close(devnull)
    return n


def init_worker(worker_id: int, *, parent_pid: int) -> None:
    """DataLoader worker_init_fn (bind parent_pid=os.getpid() in the trainer with functools.partial)."""
    for sig in SHIELDED:
        signal.signal(sig, signal.SIG_IGN)  # also discards one already pending
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHIELDED)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the trainer died before the line above
        os._exit(1)
    drop_inherited_sockets()


def kill_workers(procs: Iterable) -> None:
    """SIGKILL the multiprocessing.Process objects still alive (after the DataLoader's own shutdown)."""
    for p in procs:
        try:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass
