"""How train.py ends (trainer.distributed.exit_process): after a gloo process group it runs the atexit handlers
and skips the interpreter's finalization, where gloo's worker threads occasionally aborted finished runs
(SIGABRT, exit code 134), keeping the exit code and every buffered log line; without one it is sys.exit."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.envs import pythonpath
from tests.process_tree import kill_tree

ROOT = Path(__file__).resolve().parents[2]

RANK_SCRIPT = r"""
import atexit, logging, logging.handlers, os, sys
from pathlib import Path
import torch
from trainer import distributed

out, rank, world, port, code, gloo = (Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                      sys.argv[5], sys.argv[6])
code = None if code == "none" else int(code) if code.lstrip("-").isdigit() else code
# buffered until logging.shutdown: a log line written last must still reach the file
logging.getLogger().addHandler(logging.handlers.MemoryHandler(
    1000, flushLevel=logging.CRITICAL, target=logging.FileHandler(out / f"log{rank}.txt")))
logging.getLogger().setLevel(logging.INFO)
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))


class Finalized:  # its __del__ runs only in the interpreter's finalization (module teardown)
    def __del__(self, _open=os.open, _close=os.close, path=str(out / f"finalized{rank}")):
        _close(_open(path, os.O_CREAT | os.O_WRONLY))


_mark = Finalized()
if world > 1:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
    assert distributed.init_distributed(distributed.World(rank, world, rank), torch.device("cpu"), 60.0)
    t = torch.ones(3)
    torch.distributed.all_reduce(t)
    distributed.destroy_distributed()
    logging.getLogger("x").info("sum %s", t.tolist())
else:
    if gloo == "side":  # a gloo group beside the default one, as the asynchronous checkpoint writer's
        distributed._gloo_created = False
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        distributed.new_gloo_group()
        torch.distributed.destroy_process_group()
    elif gloo == "script":  # a script's own default group (launch/bench_exchange.py, bench_cp.py)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        distributed.init_process_group("gloo", rank=0, world_size=1)
        torch.distributed.destroy_process_group()
    logging.getLogger("x").info("single process")
print("stdout line", end="")  # no newline: flushed only by an explicit flush
distributed.exit_process(code)
"""


def _run(tmp_path: Path, world: int, code: str, gloo: str = "default"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {"PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(r), str(world), port, code, gloo],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)


def _marks(tmp_path: Path, rank: int):
    return (tmp_path / f"atexit{rank}").is_file(), (tmp_path / f"finalized{rank}").is_file()


def test_after_gloo_finalization_is_skipped_and_logs_code_and_atexit_survive(tmp_path):
    for rank, (rc, out, err) in enumerate(_run(tmp_path, 2, "75")):
        assert rc == 75, err[-2000:]
        assert out == "stdout line", (out, err[-2000:])
        assert "sum [2.0, 2.0, 2.0]" in (tmp_path / f"log{rank}.txt").read_text()
        assert _marks(tmp_path, rank) == (True, False)  # atexit handlers ran; the finalization did not


@pytest.mark.parametrize("gloo", ["side", "script"])
def test_a_gloo_group_made_elsewhere_counts(tmp_path, gloo):
    """new_gloo_group beside the default group, or a script's own default group (init_process_group)."""
    [(rc, out, err)] = _run(tmp_path, 1, "0", gloo=gloo)
    assert rc == 0 and out == "stdout line", err[-2000:]
    assert _marks(tmp_path, 0) == (True, False)


@pytest.mark.parametrize("code,expected", [("none", 0), ("3", 3), ("bad config", 1)])
def test_without_gloo_it_is_sys_exit(tmp_path, code, expected):
    [(rc, out, err)] = _run(tmp_path, 1, code)
    assert rc == expected, err[-2000:]
    assert out == "stdout line" and "single process" in (tmp_path / "log0.txt").read_text()
    assert _marks(tmp_path, 0) == (True, True)  # a normal exit, finalization included
    assert ("bad config" in err) == (code == "bad config")


def test_after_gloo_a_message_exits_with_status_1(tmp_path):
    results = _run(tmp_path, 2, "stopped: see above")
    assert [rc for rc, _, _ in results] == [1, 1], results[0][2][-2000:]
    assert all("stopped: see above" in err for _, _, err in results)
