"""How train.py ends (trainer.distributed.exit_process): after a gloo process group it skips the interpreter's
teardown, where gloo's worker threads occasionally aborted finished runs (SIGABRT, exit code 134), but
still flushes the logs and keeps the exit code; without one it exits normally (atexit handlers run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RANK_SCRIPT = r"""
import atexit, logging, sys
from pathlib import Path
import torch
from trainer import distributed

out, rank, world, port, code = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
code = None if code == "none" else int(code) if code.lstrip("-").isdigit() else code
logging.basicConfig(filename=out / f"log{rank}.txt", level=logging.INFO)
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))
if world > 1:
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
    assert distributed.init_distributed(distributed.World(rank, world, rank), torch.device("cpu"), 60.0)
    t = torch.ones(3)
    torch.distributed.all_reduce(t)
    distributed.destroy_distributed()
    logging.getLogger("x").info("sum %s", t.tolist())
else:
    logging.getLogger("x").info("single process")
print("stdout line", end="")  # no newline: flushed only by an explicit flush
distributed.exit_process(code)
"""


def _run(tmp_path: Path, world: int, code: str):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(r), str(world), port, code],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    return [(p.wait(timeout=120), *p.communicate()) for p in procs]


def test_after_gloo_the_teardown_is_skipped_and_logs_and_code_survive(tmp_path):
    for rank, (rc, out, err) in enumerate(_run(tmp_path, 2, "75")):
        assert rc == 75, err[-2000:]
        assert out == "stdout line", (out, err[-2000:])
        assert "sum [2.0, 2.0, 2.0]" in (tmp_path / f"log{rank}.txt").read_text()
        assert not (tmp_path / f"atexit{rank}").exists()  # teardown skipped: no atexit handlers


@pytest.mark.parametrize("code,expected", [("none", 0), ("3", 3), ("bad config", 1)])
def test_without_gloo_it_is_sys_exit(tmp_path, code, expected):
    [(rc, out, err)] = _run(tmp_path, 1, code)
    assert rc == expected, err[-2000:]
    assert out == "stdout line" and (tmp_path / "atexit0").read_text() == "ran"
    assert ("bad config" in err) == (code == "bad config")


def test_after_gloo_a_message_exits_with_status_1(tmp_path):
    results = _run(tmp_path, 2, "stopped: see above")
    assert [rc for rc, _, _ in results] == [1, 1], results[0][2][-2000:]
    assert all("stopped: see above" in err for _, _, err in results)

