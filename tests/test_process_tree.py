"""tests/process_tree.py: a timed-out command's children die with it, also those in a session of their own; a
normal run returns as subprocess.run does."""

import os
import subprocess
import sys
import time

import pytest

from tests.process_tree import run_tree

# a parent that starts a child sleeping far past the timeout in a session of its own (as torchrun starts its
# ranks), reports the child's pid, and waits for it
PARENT = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'], "
          "start_new_session=True); print(c.pid, flush=True); c.wait()")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timeout_kills_the_commands_children_too():
    t0 = time.time()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        run_tree([sys.executable, "-c", PARENT], timeout=3)
    # promptly: a child left alive would hold the output pipe open for its hour of sleep
    assert time.time() - t0 < 30
    child = int(e.value.output.split()[0])  # the output so far comes with the exception
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    survived = _alive(child)
    if survived:
        os.kill(child, 9)
    assert not survived, f"the command's child {child} outlived the timeout"


def test_plain_subprocess_run_leaves_the_child_running():
    """Why run_tree exists: the same command under subprocess.run orphans its child on a timeout."""
    with pytest.raises(subprocess.TimeoutExpired) as e:
        subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=3)
    child = int(e.value.output.split()[0]) if e.value.output else None
    try:
        assert child is not None and _alive(child)
    finally:
        if child is not None and _alive(child):
            os.kill(child, 9)


def test_a_normal_run_returns_its_code_and_output():
    r = run_tree([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                 timeout=60, env={**os.environ, "X": "1"})
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
