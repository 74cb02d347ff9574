"""Fault injection through train.py (real tiny Jamba, CPU): seeded kill -9 at start-up, in training and in the
middle of a (background) save, each rerun resuming; the finished run must equal an uninterrupted one bit for
bit. Plus: corrupt newest checkpoint with 2 ranks (every rank falls back to the same one), a changed corpus
and resume=false in a used run directory refused with one line."""

import os
import random
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
STEPS = 12
COMMON = ["experiment=debug", "train.num_threads=1", "logging.progress_bar=false", f"train.max_steps={STEPS}",
          "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.async_save=true"]


def _losses(run_dir):
    """step -> loss; the last record of a step wins (a resumed run logs replayed steps again)."""
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def _cmd(run_dir, *extra):
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *COMMON, *extra]


def _run(args, timeout=300):
    return run_tree(args, cwd=ROOT, env=ENV, timeout=timeout)


def _kill_when(args, ready, timeout=120):
    """Start train.py in its own process group; kill -9 the whole group (DataLoader workers too) as soon as
    ready() is true. Returns True if it was killed, False if it finished first."""
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            assert time.time() < deadline, "train.py did not reach the kill point"
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_seeded_kill9_at_random_points_resumes_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    r = _run(_cmd(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, STEPS + 1))

    rng = random.Random(17)
    d = tmp_path / "faulty"
    ckpts = d / "checkpoints"
    started = [0.0]

    stale = set()  # .tmp- directories a killed attempt left: the next one removes them at start-up

    def tmp_dirs():
        return {p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")} if ckpts.is_dir() else set()

    def saving():
        """A save of the running attempt in progress: a .tmp- directory other than the leftovers. After the
        kill, the same look tells whether the kill interrupted a save (nothing renames it then)."""
        now = tmp_dirs()
        stale.intersection_update(now)  # a leftover once removed is gone for good: a new save may reuse its name
        return bool(now - stale)

    def at_step(k):
        return lambda: max(_losses(d), default=0) >= k

    def after(seconds):
        return lambda: time.time() - started[0] > seconds

    def early(seconds):  # start-up: after a random time, but at the latest when the first step is logged (a fast
        # machine can finish the whole run within the random time, and then no later kill would hit a save)
        late, first = after(seconds), at_step(1)
        return lambda: late() or first()

    plan = [("start-up", early(rng.uniform(1.0, 4.0))), ("save", saving),
            ("training", at_step(rng.randint(5, 8))), ("save", saving)]
    hits = []
    for what, ready in plan:
        started[0] = time.time()
        stale.clear()
        stale.update(tmp_dirs())
        killed = _kill_when(_cmd(d), ready)
        hits.append((what, killed, killed and saving(), max(_losses(d), default=0)))
        if not killed:
            break
    r = _run(_cmd(d))  # the final rerun finishes the run
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(d) == expected, hits  # bit for bit, every step
    assert sum(1 for _, killed, in_save, _ in hits if killed and in_save) >= 1, hits  # a save was interrupted
    assert not (d / ".lock").exists() and not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    print("kills (point, killed, during a save, last logged step):", hits)


@pytest.mark.slow
def test_two_ranks_fall_back_together_past_a_corrupt_shard(tmp_path):
    """2 ranks (gloo, FSDP2, async saves): rank 1's shard of the newest checkpoint is damaged; both ranks
    verify, agree on the older checkpoint and reproduce the uninterrupted run's last steps exactly."""
    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"hydra.run.dir={d}", "experiment=debug", "parallel=fsdp", "train.num_threads=1",
           "logging.progress_bar=false", "train.max_steps=6", "train.eval_every=0", "checkpoint.every=2",
           "checkpoint.keep_last=3", "checkpoint.async_save=true"]
    r = _run(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = _losses(d)
    newest = d / "checkpoints" / "step_000000006"
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    r = _run(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "checkpoint step_000000006 is corrupt, skipping it: __1_0.distcp has CRC32" in log, log[-3000:]
    assert "resuming from step_000000004, the newest intact checkpoint" in log
    assert _losses(d) == ref and sorted(ref) == list(range(1, 7))
    assert (d / "checkpoints" / "invalid-step_000000006").is_dir()


@pytest.mark.slow
def test_changed_corpus_and_resume_false_are_refused_in_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = Path(ROOT / "trainer" / "loop.py").read_text()
    for i in range(2):
        (corpus / f"doc{i}.txt").write_text(text)
    d = tmp_path / "run"
    base = _cmd(d, f"data.sources=[{{path: {corpus}}}]", "data.validation_fraction=0", "train.max_steps=2")
    r = _run(base)
    assert r.returncode == 0, r.stderr[-3000:]
    (corpus / "doc2.txt").write_text(text)  # a file added between the runs
    r = _run(base[:-1] + ["train.max_steps=4"])
    assert r.returncode == 2, r.stderr[-3000:]
    err = [x for x in (r.stdout + r.stderr).splitlines() if "config error" in x]
    assert len(err) == 1 and "data.sources[0] files: 2 files" in err[0] and "-> 3 files" in err[0], err
    assert "checkpoint.allow_data_change=true" in err[0]

    r = _run(base[:-1] + ["train.max_steps=4", "checkpoint.resume=false"])
    assert r.returncode == 2
    err = [x for x in (r.stdout + r.stderr).splitlines() if "config error" in x]
    assert len(err) == 1 and "checkpoint.resume=false" in err[0] and "checkpoint.overwrite=true" in err[0], err
