"""End to end through train.py (real tiny Jamba, embedded corpus): default run's first steps, signal-triggered
checkpoint + bit-exact resume with 1 and 2 processes (torchrun, gloo, FSDP2), and a Hydra sweep."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.jsonl import read_jsonl
from tests.process_tree import run_tree

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
QUIET = ["logging.progress_bar=false", "logging.log_every=1"]


def _records(run_dir):
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _run(args, timeout=300):
    return run_tree(args, cwd=ROOT, env=ENV, timeout=timeout)


def _interrupt(args, run_dir, pick_pid=lambda p: p.pid, after_step=1, timeout=300):
    """Start, wait for `after_step` in metrics.jsonl, send SIGUSR1 to pick_pid(proc), wait for the exit."""
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not any(r.get("step", 0) >= after_step for r in _records(run_dir)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(pick_pid(proc), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _cmd(run_dir, *overrides):
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *QUIET, *overrides]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default recipe (experiment=cpu_demo), 6 steps, uninterrupted."""
    d = tmp_path_factory.mktemp("default")
    r = _run(_cmd(d, "train.max_steps=6", "optim.warmup_steps=2", "train.eval_every=3", "checkpoint.every=3"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d


@pytest.mark.slow
def test_default_run_first_steps(default_run):
    recs = _records(default_run)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert [r["tokens"] for r in train] == [4096 * s for s in range(1, 7)]
    for r in train:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
        assert {"lr", "aux_loss", "moe_load_max", "moe_load_min", "mem_gb"} <= set(r)
        # the step's routed token copies per MoE layer (2) and expert (4): 4096 tokens x top-2 in each layer
        assert [sum(layer) for layer in r["moe_counts"]] == [4096 * 2] * 2 and len(r["moe_counts"][0]) == 4
    assert abs(train[0]["loss"] - math.log(2048)) < 0.3  # starts at ~ln(vocab)
    assert train[-1]["loss"] < train[0]["loss"] - 0.2  # and falls
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    # what EP=2 / EP=4 would make of this routing, from the run directory (launch/ep_balance.py)
    from launch.ep_balance import busiest_rank_loads, read_counts, summarise

    rows = summarise(read_counts(default_run, skip=0), [2, 4])
    assert [(row["ep"], row["experts_per_rank"], row["records"]) for row in rows] == [(2, 2, 6), (4, 1, 6)]
    last = train[-1]["moe_counts"]
    assert max(busiest_rank_loads(last, 4)) == pytest.approx(train[-1]["moe_load_max"])  # one expert per rank
    for name in ("config.yaml", "tokenizer.model", "checkpoints/step_000000006/COMPLETE"):
        assert (default_run / name).is_file(), name


@pytest.mark.slow
def test_signal_checkpoint_and_exact_resume_one_process(default_run, tmp_path):
    args = _cmd(tmp_path, "train.max_steps=6", "optim.warmup_steps=2", "train.eval_every=3", "checkpoint.every=0")
    code, out = _interrupt(args, tmp_path)
    assert code == 75, out[-3000:]  # EXIT_PREEMPTED after the signal's checkpoint
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0] < "step_000000006", ckpts
    r = _run(args)  # the same command resumes
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _losses(tmp_path) == _losses(default_run)  # bit for bit


@pytest.mark.slow
def test_exact_resume_two_processes(tmp_path):
    """torchrun 2 ranks (gloo, FSDP2): SIGUSR1 to rank 1 only; both ranks agree, checkpoint, exit; the rerun
    reproduces the uninterrupted 2-process run's losses exactly. (10 steps: the signal, sent after step 1, must
    reach rank 1 before the last step's stop-flag all-reduce, also on a loaded machine.)"""
    def cmd(d):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                f"hydra.run.dir={d}", *QUIET, "experiment=debug", "parallel=fsdp", "train.max_steps=10",
                "checkpoint.every=0", "train.eval_every=0"]

    ref = tmp_path / "ref"
    r = _run(cmd(ref))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def rank1_pid(proc):
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if b"RANK=1" in env:
                return int(child)
        raise AssertionError("no rank-1 worker found")

    d = tmp_path / "resumed"
    code, out = _interrupt(cmd(d), d, pick_pid=rank1_pid)
    assert code != 0 and "exitcode  : 75" in out, out[-3000:]
    assert len([p for p in (d / "checkpoints").iterdir() if p.name.startswith("step_")]) == 1
    r = _run(cmd(d))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _losses(d) == _losses(ref) and len(_losses(ref)) == 10


@pytest.mark.slow
def test_sweep_runs_each_point_in_its_own_dir(tmp_path):
    r = _run([sys.executable, "train.py", "-m", f"hydra.sweep.dir={tmp_path}", "experiment=debug",
              "train.max_steps=2", "train.eval_every=0", "optim.lr=1e-3,3e-4"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dirs = sorted(p for p in tmp_path.iterdir() if (p / "metrics.jsonl").is_file())
    # the run directory names the point's defining overrides (train.max_steps, train.eval_every do not define it)
    from trainer.rundir import run_leaf
    assert [p.name for p in dirs] == [run_leaf(["optim.lr=3e-4"]), run_leaf(["optim.lr=1e-3"])]
    assert dirs[0].name.startswith("optim.lr=0.0003-")
    peaks = []
    for d in dirs:
        recs = _records(d)
        assert [x["step"] for x in recs] == [1, 2]
        peaks.append(max(x["lr"] for x in recs))
        assert (d / "checkpoints" / "step_000000002" / "COMPLETE").is_file()
    assert peaks == [3e-4, 1e-3]
