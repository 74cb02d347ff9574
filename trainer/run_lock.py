"""One live training job per run directory: `<run dir>/.lock` names its owner (host, pid, start time).

Two jobs on one run directory would delete each other's in-progress saves and interleave metrics. The lock
is a small JSON file created with O_EXCL by rank 0. A lock left by a dead process is taken over when that
can be proven: same host and the pid is gone (or reused by another process: the kernel's start time
differs), or the same SLURM job (a requeued job restarts under its own id) or a later torchrun restart of
the same rendezvous. Otherwise the error names the owner; a lock from a node that crashed has to be
deleted by hand (the message says which file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

from jamba.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another live process owns the run directory."""


def _proc_start(pid: int) -> Optional[str]:
    """The kernel's start time of pid (field 22 of /proc/pid/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _me() -> Dict[str, Any]:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "slurm_job": env.get("SLURM_JOB_ID"), "torchelastic_run": env.get("TORCHELASTIC_RUN_ID"),
            "torchelastic_restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}


def _same_process(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return (a.get("host"), a.get("pid"), a.get("proc_start")) == (b.get("host"), b.get("pid"), b.get("proc_start"))


def stale_reason(owner: Dict[str, Any], me: Dict[str, Any]) -> Optional[str]:
    """Why the owner's lock can be taken over, or None when it may still be live."""
    if owner.get("slurm_job") and owner.get("slurm_job") == me.get("slurm_job") and owner.get("host") != me["host"]:
        return f"left by an earlier run of SLURM job {owner['slurm_job']} (requeued)"
    if (owner.get("torchelastic_run") and owner.get("torchelastic_run") == me.get("torchelastic_run")
            and int(owner.get("torchelastic_restart", 0)) < me["torchelastic_restart"]):
        return "left by an earlier torchrun attempt (restarted)"
    if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)), owner.get("proc_start")):
        return f"pid {owner.get('pid')} is no longer running on this host"
    return None


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = _me()
        self.held = False

    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or garbage

    def acquire(self) -> None:
        body = json.dumps(self.me).encode()
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released in between
                if owner and _same_process(owner, self.me):
                    self.held = True  # this process already holds it (tests build several managers)
                    return
                if not owner:  # unreadable: a writer in the middle of its write, or a torn file
                    if time.time() - self._mtime() < 5:
                        time.sleep(0.1)
                        continue
                    reason = "unreadable and older than 5 s"
                else:
                    reason = stale_reason(owner, self.me)
                if reason is None:
                    raise RunDirBusy(self._busy_message(owner))
                log.warning("taking over the run directory's stale lock %s (%s)", self.path, reason)
                # Replace atomically, then re-read: of two processes taking over at once, one wins.
                tmp = self.path.with_name(f"{LOCK_NAME}.{self.me['pid']}.tmp")
                tmp.write_bytes(body)
                os.replace(tmp, self.path)
                time.sleep(0.05)
                if _same_process(self._read() or {}, self.me):
                    self.held = True
                    return
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise RunDirBusy(f"could not lock the run directory {self.path.parent} (contended); try again")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _busy_message(self, owner: Dict[str, Any]) -> str:
        return (f"run directory {self.path.parent} is in use by pid {owner.get('pid')} on host {owner.get('host')} "
                f"(started {owner.get('started')}): two jobs on one run directory would overwrite each other's "
                f"checkpoints. Wait for it or stop it, or use another run directory (hydra.run.dir=... or name=...); "
                f"if that process is gone (e.g. its node crashed), delete {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _same_process(self._read() or {}, self.me):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
