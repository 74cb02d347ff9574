"""The step loop on 2 ranks (gloo, FSDP2, stand-in model; tests/trainer/dist_trainer_worker.py), launched as two
plain processes as on two nodes:

- validation splits of unequal length (1 and 3 batches) no longer deadlock, and the validation loss is the
  mean over all 4 batches of both ranks (the first 2-GPU runs hung in `evaluate`);
- a rank that stops (SIGSTOP) or dies (SIGKILL) in a training step or inside a checkpoint save makes the
  other exit within the configured `collective_timeout_s` (plus start-up slack), with an error that names
  the stopped rank and the operation it was waiting in.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.envs import pythonpath
from tests.process_tree import run_tree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, scenario: str, timeout_s: float):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        log = open(out / f"log{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_trainer_worker.py"), str(out), scenario,
                                       str(timeout_s)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL also ends a stopped process
            p.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_unequal_validation_splits_do_not_deadlock(tmp_path):
    procs = _start(tmp_path, "eval_unequal", 60)
    try:
        for p in procs:
            p.wait(timeout=150)
    finally:
        _kill_all(procs)
    logs = [(tmp_path / f"log{r}.txt").read_text() for r in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(x[-3000:] for x in logs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(r0["own_losses"]) == 1 and len(r1["own_losses"]) == 3
    expected = sum(r0["own_losses"] + r1["own_losses"]) / 4  # every batch of both ranks counts once
    assert len(r0["val"]) == 1
    # fp32 on CPU: the FSDP forward and the plain one run the same ops on the same weights (rounding only)
    assert r0["val"][0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("scenario,waits_in", [
    ("stop_in_step", "at step 3"),
    ("kill_in_step", "at step 3"),
    ("stop_in_save", "checkpoint save at step 2"),
])
def test_a_stopped_or_dead_rank_becomes_an_error(tmp_path, scenario, waits_in):
    timeout_s = 8.0
    procs = _start(tmp_path, scenario, timeout_s)
    survivor, victim = procs
    try:
        deadline = time.time() + 120
        while _state(victim.pid) not in ("T", "Z", "gone") and victim.poll() is None:  # stopped or dead
            assert survivor.poll() is None, (tmp_path / "log0.txt").read_text()[-3000:]
            assert time.time() < deadline, "rank 1 never reached the fault"
            time.sleep(0.05)
        t0 = time.time()
        survivor.wait(timeout=2 * timeout_s + 30)
        waited = time.time() - t0
    finally:
        _kill_all(procs)
    log = (tmp_path / "log0.txt").read_text()
    assert survivor.returncode not in (0, None), log[-3000:]
    # in-band: the collective's own timeout (gloo) or the peer's closed socket, well before the watchdog's 2T
    assert waited < timeout_s + 10, (waited, log[-3000:])
    assert "CollectiveTimeout" in log and "rank 0 of 2:" in log, log[-3000:]
    assert waits_in in log.split("CollectiveTimeout", 1)[1], log[-3000:]
    if scenario.startswith("stop"):  # the heartbeats say which rank stopped
        assert "rank 1 (host" in log and "sent no heartbeat" in log, log[-3000:]


def test_train_py_validation_with_unequal_splits(tmp_path):
    """The user's path: torchrun, the real tiny model under FSDP2, the embedded corpus's held-out split
    (validation_fraction 0.005 gives the two ranks 50 and 12 batches of 2 x 64 tokens); it used to hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "experiment=debug", "parallel=fsdp", "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1000",
           "data.validation_fraction=0.005", "checkpoint.every=0", "checkpoint.save_final=false",
           "train.collective_timeout_s=30", f"hydra.run.dir={tmp_path}"]
    r = run_tree(cmd, cwd=ROOT, env=env, timeout=170)
    assert r.returncode == 0, r.stderr[-4000:]
    vals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [v["step"] for v in vals] == [2] and 0 < vals[0]["val_loss"] < 20


def test_train_py_stopped_rank_with_expert_parallelism(tmp_path):
    """train.py under EP (its collectives run on device-mesh sub-groups, which c10d would give its own 30-min
    gloo default), two ranks started as separate nodes: rank 1 SIGSTOPped after step 3; rank 0 exits with
    the rank and the operation named within train.collective_timeout_s (10 s) plus slack."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": pythonpath(),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        cmd = [sys.executable, "train.py", "experiment=debug", "parallel=ep", "train.max_steps=1000",
               "train.eval_every=0", "checkpoint.every=0", "train.collective_timeout_s=10",
               f"hydra.run.dir={tmp_path / 'run'}"]
        log = open(tmp_path / f"log{rank}.txt", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    survivor, victim = procs
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 150
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert survivor.poll() is None and victim.poll() is None, (tmp_path / "log0.txt").read_text()[-3000:]
            assert time.time() < deadline, "no 3 steps in time"
            time.sleep(0.1)
        os.kill(victim.pid, signal.SIGSTOP)
        t0 = time.time()
        survivor.wait(timeout=60)
        waited = time.time() - t0
    finally:
        _kill_all(procs)
    log = (tmp_path / "log0.txt").read_text()
    assert survivor.returncode not in (0, None) and waited < 10 + 10, (waited, log[-3000:])
    assert "CollectiveTimeout: rank 0 of 2:" in log and "rank 1 (host" in log, log[-3000:]
