"""Hangs become errors: a rank that dies or stalls makes the others exit within a bounded time, saying
which rank stopped and what each was doing.

Three layers, all bounded by `train.collective_timeout_s` (T):

1. The process group's timeout is T (`init_distributed`): a collective that waits for a dead or stopped
   peer fails after T (gloo raises; NCCL's watchdog aborts the process, TORCH_NCCL_ASYNC_ERROR_HANDLING).
2. The trainer runs its work inside named phases (`Watchdog.phase("all_reduce of the validation loss
   during evaluate", step)`); a distributed failure inside one is re-raised as `CollectiveTimeout` naming
   this rank, the phase, the step, the seconds waited and, from heartbeats every rank writes to the
   process group's store every few seconds, which peers stopped answering and where they were:

       rank 0 of 2: all_reduce of the step's losses and flags at step 7 failed after 10.0 s (limit
       train.collective_timeout_s=10): rank 1 (host a, pid 123) sent no heartbeat for 11 s; its last one
       placed it in 'forward and backward' at step 7 -- stopped, hung or dead.

3. A thread of this process warns when one phase has made no progress for T/2 (with NCCL, whose watchdog
   takes the process down at T, the log then names the phase first), and ends the process with exit code
   EXIT_HUNG after 2T: the bound for hangs no collective timeout covers (a stuck data loader, a blocked
   shutdown, NCCL with async error handling off). It logs the same report and every thread's stack first.
   A phase that may compile or build (a process's first training step and validation, start-up, shutdown)
   gets at least 30 min.

T must exceed the longest time one rank may legitimately wait for another inside a collective (e.g. a
slower rank's checkpoint write or compilation); the first step and checkpoint saves do count.

On GPUs collectives are asynchronous: the host notices a stuck one where it next waits for the device (the
step's one sync, a checkpoint save), so the phase says where this rank waited; NCCL's own timeout message
(its watchdog's, with OpType and SeqNum) names the collective itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_HUNG = 124
"""Exit code when the watchdog thread ends a rank stuck for 2 x train.collective_timeout_s (as timeout(1))."""
COMPILE_ALLOWANCE_S = 1800.0
"""No-progress bound (at least) of a patient phase: one that may compile (a process's first training step
and validation) or build (start-up: model, checkpoint load) or wait for a background save (shutdown)."""
_KEY = "jamba_heartbeat/"
_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset", "broken pipe",
            "socket", "peer", "collective")


class CollectiveTimeout(RuntimeError):
    """A collective failed because a peer died, stopped or fell behind by more than the timeout."""


def is_distributed_failure(e: BaseException) -> bool:
    """A failure of the process group (including DCP's CheckpointException, a BaseException, wrapping one)."""
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, CollectiveTimeout)):
        return False
    if isinstance(e, dist.DistError):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(m in text for m in _MARKERS) and (isinstance(e, RuntimeError) or "checkpoint" in text)


@dataclass
class _Phase:
    name: str
    step: Optional[int]
    wall: float  # time.time() when it began (for other ranks, via the heartbeat)
    patient: bool = False  # may compile or build (first step, validation, start-up): allowed longer

    def where(self) -> str:
        return self.name + (f" at step {self.step}" if self.step is not None else "")


class NullWatchdog:
    """The same interface without a process group (single process): phases only name the work."""

    timeout_s = None

    @contextlib.contextmanager
    def phase(self, name: str, step: Optional[int] = None, patient: bool = False):
        yield

    def close(self) -> None:
        pass


class Watchdog(NullWatchdog):
    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None, exit_fn=os._exit):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.beat_s = min(5.0, max(0.5, self.timeout_s / 10))
        # A phase change is published at once but at most every min_gap_s (rate limit for the store's host).
        self.min_gap_s = 0.2 * max(1.0, world_size / 64)
        self._changed = threading.Event()
        self.store = store if store is not None else _default_store()
        self._exit = exit_fn
        self._stack: List[_Phase] = [_Phase("start-up or shutdown (outside the step loop)", None, time.time(),
                                            patient=True)]
        self._progress = time.monotonic()  # last phase change: "no progress" is measured from it
        self._warned = False
        self._stop = threading.Event()
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._threads = [threading.Thread(target=self._check_loop, name="jamba-watchdog", daemon=True)]
        if self.store is not None:
            self._threads.append(threading.Thread(target=self._beat_loop, name="jamba-heartbeat", daemon=True))
        for t in self._threads:
            t.start()

    # ---- phases ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, step: Optional[int] = None, patient: bool = False):
        """Run the body as `name` (at `step`); a distributed failure in it becomes a CollectiveTimeout.
        patient: the body may compile (a process's first step or validation): the no-progress bound is
        then at least COMPILE_ALLOWANCE_S (every rank compiles at once, so collectives do not time out)."""
        self._enter(_Phase(name, step, time.time(), patient))
        t0 = time.monotonic()
        try:
            yield
        except BaseException as e:
            self._leave()
            if not is_distributed_failure(e):
                raise
            waited = time.monotonic() - t0
            # Whatever happens next (the exception unwinding, process-group teardown) is bounded too.
            self._enter(_Phase(f"shutting down after a failure in {name}", step, time.time()))
            raise CollectiveTimeout(self.report(f"{name}{f' at step {step}' if step is not None else ''} "
                                                f"failed after {waited:.1f} s", cause=e)) from e
        self._leave()

    def _enter(self, p: _Phase) -> None:
        self._stack.append(p)
        self._progress, self._warned = time.monotonic(), False
        self._changed.set()

    def _leave(self) -> None:
        if len(self._stack) > 1:
            self._stack.pop()
        self._progress, self._warned = time.monotonic(), False

    @property
    def current(self) -> _Phase:
        return self._stack[-1]

    # ---- reports ----------------------------------------------------------------------------------
    def report(self, what: str, cause: Optional[BaseException] = None) -> str:
        head = (f"rank {self.rank} of {self.world_size}: {what} (limit train.collective_timeout_s="
                f"{self.timeout_s:g})")
        lines = [head + ": " + self.peers()]
        if cause is not None:
            first = str(cause).strip().splitlines()
            lines.append(f"cause: {type(cause).__name__}: {first[0][:500] if first else ''}")
        lines.append("fix: find the named rank's log (its error or stack); if it was only slow (compilation, a "
                     "large checkpoint write), raise train.collective_timeout_s")
        return "\n".join(lines)

    def peers(self) -> str:
        """Which peers stopped sending heartbeats (read from the store, bounded in time)."""
        if self.store is None:
            return "no heartbeats to compare (no process-group store)"
        found: dict = {}

        def read():
            for r in range(self.world_size):
                if r != self.rank:
                    key = _KEY + str(r)
                    found[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout=max(2.0, 2 * self.beat_s) + 0.01 * self.world_size)
        if t.is_alive() and not found:
            return ("the rendezvous store (on rank 0, or its torchrun agent) does not answer: rank 0 or its "
                    "node is probably the one that stopped or died")
        now, stale, alive = time.time(), [], []
        found = dict(found)  # one atomic copy: the reader thread may still be adding
        for r in sorted(found):
            hb = found[r]
            if hb is None:
                stale.append(f"rank {r} never sent a heartbeat")
                continue
            where = hb["phase"] + (f" at step {hb['step']}" if hb.get("step") is not None else "")
            age = now - hb["t"]
            who = f"rank {r} (host {hb['host']}, pid {hb['pid']})"
            if age > 3 * self.beat_s + 1:
                stale.append(f"{who} sent no heartbeat for {age:.0f} s; its last one placed it in '{where}' -- "
                             f"stopped, hung or dead")
            else:
                alive.append(f"{who} is alive in '{where}' (for {now - hb['since']:.0f} s)")
        return "; ".join(stale + alive) or "no other ranks"

    # ---- threads ----------------------------------------------------------------------------------
    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(self.beat_s)
            self._changed.clear()
            p = self.current
            try:
                self.store.set(_KEY + str(self.rank), json.dumps(
                    {"t": time.time(), "phase": p.name, "step": p.step, "since": p.wall, "host": self._host,
                     "pid": self._pid}))
            except Exception:  # noqa: BLE001 - the store's host is gone: the checker thread reports the hang
                if self._stop.wait(self.beat_s):
                    return
            if self._stop.wait(self.min_gap_s):
                return

    def _check_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.beat_s)):
            idle = time.monotonic() - self._progress
            p = self.current
            limit = max(2 * self.timeout_s, COMPILE_ALLOWANCE_S) if p.patient else 2 * self.timeout_s
            if idle > limit:
                msg = self.report(f"no progress for {idle:.0f} s in {p.where()}: ending this process "
                                  f"(exit code {EXIT_HUNG})")
                log.error("%s", msg)
                print(msg, file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                self._exit(EXIT_HUNG)
                return
            if idle > limit / 4 and not self._warned:
                self._warned = True
                log.warning("%s", self.report(f"no progress for {idle:.0f} s in {p.where()}; collectives fail "
                                              f"at {self.timeout_s:g} s"))

    def close(self) -> None:
        self._stop.set()


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; without it there are no heartbeats, the rest works
        return None


def make_watchdog(rank: int, world_size: int, timeout_s: float) -> NullWatchdog:
    """A Watchdog when a process group with more than one rank exists, else the no-op one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Watchdog(rank, world_size, timeout_s)
    return NullWatchdog()
