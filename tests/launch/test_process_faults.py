"""Faults under torchrun (plain `torchrun`, not our launch scripts, as users run it), 2 ranks on CPU with gloo:
kill -9 of one rank with --max-restarts=1 must restart, resume and reproduce the uninterrupted run's losses
exactly, within a bounded time; kill -9 of the torchrun agent must not leave ranks training on their own;
no DataLoader worker may outlive its rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.jsonl import read_jsonl
from tests.envs import pythonpath
from tests.process_tree import run_tree

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
ARGS = ["experiment=debug", "parallel=ddp", "train.num_threads=1", f"train.max_steps={STEPS}", "checkpoint.every=4",
        "train.eval_every=0", "logging.progress_bar=false", "logging.log_every=1", "data.num_workers=1"]

pytestmark = pytest.mark.slow


def env():
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC", "TORCH_DISABLE_SHARE"))}
    return dict(e, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=pythonpath())


def torchrun(run_dir, *opts):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *opts,
            str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *ARGS]


def losses(run_dir):
    out = {}
    for r in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def complete_steps(run_dir):
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "COMPLETE").is_file()) \
        if root.is_dir() else []


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def ranks(agent_pid):
    """{RANK: pid} of the agent's worker processes."""
    out = {}
    for pid in children(agent_pid):
        try:
            envs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for e in envs:
            if e.startswith(b"RANK="):
                out[int(e[5:])] = pid
    return out


def processes_of(run_dir):
    """Pids whose command line names run_dir (ranks and their forked DataLoader workers)."""
    marker, found = str(run_dir).encode(), []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return [p for p in found if p != os.getpid()]


@pytest.fixture
def reap(tmp_path):
    yield
    for pid in processes_of(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_until(predicate, proc, what, timeout):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {what}:\n{proc.log.read_text()[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout} s:\n{proc.log.read_text()[-4000:]}")
        time.sleep(0.05)


def start(cmd, log):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    r = run_tree(torchrun(d), cwd=ROOT, env=env(), timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ref = losses(d)
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in ref.values())
    return {k: v[0] for k, v in ref.items()}


def test_kill9_of_a_rank_restarts_and_resumes_exactly(tmp_path, reference, reap):
    run_dir = tmp_path / "run"
    t0 = time.time()
    proc = start(torchrun(run_dir, "--max-restarts=1"), tmp_path / "torchrun.log")
    wait_until(lambda: complete_steps(run_dir) and max(losses(run_dir)) > complete_steps(run_dir)[-1], proc,
               "a step after the first checkpoint", 120)
    victims = ranks(proc.pid)
    assert sorted(victims) == [0, 1], victims
    killed_after = max(losses(run_dir))
    os.kill(victims[1], signal.SIGKILL)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish within 90 s of the kill:\n{proc.log.read_text()[-4000:]}")
    out = proc.log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert killed_after < STEPS, "the kill came too late to interrupt the run"
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    assert got == {step: [loss] for step, loss in reference.items()}  # each step once, bit for bit
    redone = [json.loads(x) for x in (run_dir / "metrics.replayed.jsonl").read_text().splitlines()
              if x.endswith("}")]  # (a line torn by the kill is set aside too)
    assert redone and all(r["loss"] == reference[r["step"]] for r in redone if r.get("loss") is not None)
    assert not processes_of(run_dir), "processes outlived torchrun"
    print(f"kill -9 at step {killed_after}: finished {time.time() - t0:.0f} s after start")


def gone(pids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in stat_state(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def stat_state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def test_kill9_of_the_agent_stops_the_ranks(tmp_path, reap):
    """The ranks notice that torchrun is gone, checkpoint after their step and exit; nothing trains on alone."""
    run_dir = tmp_path / "run"
    cmd = torchrun(run_dir) + ["train.max_steps=100000"]
    proc = start(cmd, tmp_path / "torchrun.log")
    wait_until(lambda: max(losses(run_dir), default=0) >= 2, proc, "step 2", 120)
    pids = processes_of(run_dir)
    assert len(ranks(proc.pid)) == 2 and len(pids) >= 4, pids  # 2 ranks, their DataLoader workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = gone(pids, 60)
    assert not left, f"still running 60 s after kill -9 of the agent: {left}"
    stopped = max(losses(run_dir))
    # the newest checkpoint is the step where they stopped (a slow machine may also pass the scheduled one at 4)
    assert complete_steps(run_dir)[-1] == stopped, (complete_steps(run_dir), stopped)


def test_kill9_of_the_trainer_takes_its_workers(tmp_path, reap):
    """A DataLoader worker dies with its trainer (it used to live on, orphaned, holding the trainer's sockets)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *ARGS, "parallel=single",
           "data.num_workers=2", "train.max_steps=100000"]
    proc = start(cmd, tmp_path / "train.log")
    wait_until(lambda: max(losses(run_dir), default=0) >= 2, proc, "step 2", 120)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not gone(workers, 10), "DataLoader workers outlived their trainer"


@pytest.mark.parametrize("sig", ["SIGINT"])  # SIGTERM takes the same path in torchrun and here
def test_signalled_torchrun_wrapper_exits_75_without_a_traceback(tmp_path, reap, sig):
    """launch.torchrun (what our launch scripts run): Ctrl-C or SIGTERM to the launcher's process group;
    torchrun forwards it, the ranks checkpoint and exit 75, and so does the launcher, with one line."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.torchrun", *torchrun(run_dir)[3:], "train.max_steps=100000"]
    proc = start(cmd, tmp_path / "torchrun.log")
    wait_until(lambda: max(losses(run_dir), default=0) >= 2, proc, "step 2", 120)
    os.killpg(proc.pid, getattr(signal, sig))
    proc.wait(timeout=90)
    out = proc.log.read_text()
    assert proc.returncode == 75, out[-4000:]
    assert "Traceback" not in out and "every worker checkpointed and exited 75" in out, out[-4000:]
    # the newest checkpoint is the step where they stopped (a signal reaching the ranks after step 4's stop-flag
    # all-reduce lets them save the scheduled checkpoint 4 first and stop at 5)
    assert complete_steps(run_dir)[-1] == max(losses(run_dir)), (complete_steps(run_dir), max(losses(run_dir)))
