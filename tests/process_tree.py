"""Run a command that starts processes of its own (torchrun and its ranks, train.py and its DataLoader workers)
so that a timeout leaves nothing it started running.

`subprocess.run(..., timeout=...)` kills only the command: torchrun dies and its ranks, orphaned, keep running,
holding the cores of a 2-core CI machine for the tests after it (and possibly a port or a file). A process group
or session kill does not reach them either: torchrun starts every rank in a session of its own. So on a timeout
(or an interrupted test) `run_tree` finds every descendant of the command through /proc and kills them all."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence


def _parents() -> Dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty where there is none)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            out[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass  # exited while we read
    return out


def descendants(pid: int) -> List[int]:
    """Every process whose chain of parents leads to `pid`, whatever its session."""
    children: Dict[int, List[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _signal(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants. They are stopped first, so that none starts a new process (or is
    reparented away from the tree by its parent's death) between the listing and the kill."""
    tree = [pid] + descendants(pid)
    _signal(tree, signal.SIGSTOP)
    tree = sorted(set(tree + descendants(pid)))
    _signal(tree, signal.SIGKILL)


def run_tree(cmd: Sequence[str], *, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen_kwargs)`, except that on a
    timeout every process the command started is killed with it before `subprocess.TimeoutExpired` (carrying
    the output so far) is raised."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            try:  # the pipes close once the tree is dead, unless a process outside it (reparented) holds them
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired as e:
                out, err = e.output, e.stderr
                proc.stdout.close()
                proc.stderr.close()
                proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        except BaseException:  # e.g. KeyboardInterrupt: take the whole tree down with the test
            kill_tree(proc.pid)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
