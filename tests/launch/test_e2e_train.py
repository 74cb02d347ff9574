"""End to end with the real train.py (tiny model, CPU, gloo): the launchers' preemption, requeue, elastic
restart and multi-node paths must reproduce the losses of an uninterrupted run exactly (a restart on fewer nodes
of an elastic range: within 1e-4, its gradient accumulation summing in another order than data parallelism).

All runs: 2 ranks (DDP), 12 steps of 2 x 64 tokens per rank, a checkpoint every 4 steps. Losses come from
metrics.jsonl in each run directory.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import SlurmJob, render_sbatch
from trainer.jsonl import read_jsonl
from tests.process_tree import run_tree

REPO = Path(__file__).resolve().parents[2]
FAKE_SLURM = Path(__file__).with_name("fake_slurm")
STEPS = 12
TRAIN_ARGS = ["experiment=debug", "parallel=ddp", f"train.max_steps={STEPS}", "checkpoint.every=4",
              "train.eval_every=0", "logging.log_every=1", "logging.progress_bar=false"]
TIMEOUT = 240

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (REPO / "train.py").exists(), reason="needs train.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC", "NNODES"))}
    env.update(PYTHON=sys.executable, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> the training losses logged for it, in file order (a step redone after a restart appears twice)."""
    out: dict[int, list[float]] = {}
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if "loss" in rec:
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def complete_checkpoints(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*") if (p / "COMPLETE").exists()) \
        if ckpts.exists() else []


def start(cmd, log: Path, **kwargs) -> subprocess.Popen:
    """Popen with output to a file: a process that outlives its parent cannot block reading its pipe."""
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, **kwargs)
    proc.log = log
    return proc


def output(proc) -> str:
    return proc.log.read_text() if getattr(proc, "log", None) else ""


@pytest.fixture
def reap(tmp_path):
    """After the test, SIGKILL any process still running with this test's tmp_path on its command line.

    torchrun starts each worker in its own session, and a worker's DataLoader process whose parent was
    SIGKILLed is orphaned (blocked writing its queue), so neither the launcher nor a process group reaches it."""
    yield
    marker = str(tmp_path).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def wait_for(predicate, proc, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{output(proc)[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def finish(proc, timeout: float = TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"timed out:\n{output(proc)[-4000:]}")
    return output(proc)


def assert_same_losses(run_dir: Path, reference: dict[int, list[float]]) -> dict[int, list[float]]:
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps logged: {sorted(got)}"
    for step, values in got.items():
        assert values == [reference[step][0]] * len(values), f"step {step}: {values} != {reference[step]}"
    return got


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, list[float]]:
    """An uninterrupted 2-process run through launch/single_node.sh."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = run_tree([str(REPO / "launch/single_node.sh"), "-n", "2", *TRAIN_ARGS, f"hydra.run.dir={run_dir}"],
                   env=clean_env(), cwd=REPO, timeout=TIMEOUT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in ref.values())
    assert ref[STEPS][0] < ref[1][0]  # it trains
    return ref


def test_fake_slurm_sigusr1_checkpoints_requeues_and_resumes(tmp_path, reference, reap):
    """The batch script gets SIGUSR1 (as from `--signal=B:USR1@...`) mid-run: the tasks checkpoint and exit,
    the script runs `scontrol requeue`; the requeued job (same job id, same job name) resumes in the same run
    directory and ends with exactly the uninterrupted run's losses."""
    run_dir, slurm_log = tmp_path / "runs" / "e2e", tmp_path / "slurm.log"
    job = SlurmJob(job_name="e2e", nodes=1, gpus_per_node=2, time="1:00:00", signal_lead_s=120,
                   rdzv_port=free_port(), rdzv_conf="join_timeout=300",  # torchrun must accept what we pass
                   runs_root=str(tmp_path / "runs"), log_dir=str(tmp_path / "logs"), python=sys.executable,
                   train_args=TRAIN_ARGS)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    env = clean_env(PATH=f"{FAKE_SLURM}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(slurm_log),
                    SLURM_JOB_ID="4242", SLURM_JOB_NAME="e2e", SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1",
                    SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO))

    first = start(["bash", str(script)], tmp_path / "first.log", env=env, cwd=tmp_path)
    wait_for(lambda: max(losses(run_dir), default=0) >= 2, first, "step 2")
    first.send_signal(signal.SIGUSR1)  # SLURM signals only the batch shell (B:)
    out = finish(first)
    assert first.returncode == 0, out[-4000:]
    assert "got SIGUSR1" in out and "requeueing job 4242" in out
    assert slurm_log.read_text() == "requeue 4242\n"
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS, "the signal came too late to interrupt the run"
    assert complete_checkpoints(run_dir)[-1] == stopped_at  # saved at the step it stopped after

    second = start(["bash", str(script)], tmp_path / "second.log", env=dict(env, SLURM_RESTART_COUNT="1"),
                   cwd=tmp_path)
    out = finish(second)
    assert second.returncode == 0, out[-4000:]
    assert slurm_log.read_text() == "requeue 4242\n"  # finished: no second requeue
    got = assert_same_losses(run_dir, reference)
    assert all(len(v) == 1 for v in got.values())  # resumed right after the saved step: nothing redone
    assert complete_checkpoints(run_dir)[-1] == STEPS


def worker_pids(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def test_sigkilled_worker_is_restarted_and_resumes(tmp_path, reference, reap):
    """torchrun --max-restarts=1: one worker is SIGKILLed after a checkpoint; the worker group restarts,
    resumes from the newest checkpoint, redoes the lost steps identically and finishes."""
    run_dir = tmp_path / "run"
    # The surviving worker gets SIGTERM, which the trainer takes as "checkpoint after this step"; blocked in a
    # collective with the dead rank it cannot, so torchrun SIGKILLs it after the shutdown timeout (5 s here).
    proc = start([str(REPO / "launch/single_node.sh"), "-n", "2", "-r", "1", *TRAIN_ARGS, f"hydra.run.dir={run_dir}"],
                 tmp_path / "torchrun.log", env=clean_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5"), cwd=REPO)
    # single_node.sh execs torchrun, so proc.pid is the elastic agent and the workers are its children.
    wait_for(lambda: complete_checkpoints(run_dir) and max(losses(run_dir)) > complete_checkpoints(run_dir)[-1],
             proc, "a step after the first checkpoint")
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, workers
    killed_after = max(losses(run_dir))
    os.kill(workers[1], signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert killed_after < STEPS, "the kill came too late to interrupt the run"
    got = assert_same_losses(run_dir, reference)
    assert all(len(v) == 1 for v in got.values())  # redone steps' first records: metrics.replayed.jsonl
    assert (run_dir / "metrics.replayed.jsonl").is_file(), "no step was redone: did the workers restart?"


def test_two_nodes_by_two_processes_train(tmp_path, reap):
    """launch/multi_node.sh on two "nodes" (two torchrun agents, one c10d rendezvous on 127.0.0.1) x 2
    processes trains the tiny model as one world of 4 ranks."""
    run_dir, port = tmp_path / "run", free_port()
    args = [str(REPO / "launch/multi_node.sh"), "-N", "2", "-n", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--rdzv-id", "e2e", "experiment=debug", "parallel=ddp",
            "train.max_steps=3", "train.global_batch_tokens=512", "checkpoint.every=0", "train.eval_every=0",
            "logging.log_every=1", "logging.progress_bar=false", f"hydra.run.dir={run_dir}"]
    nodes = [start(args, tmp_path / f"node{i}.log", env=clean_env(), cwd=REPO) for i in range(2)]
    outs = [finish(p) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3] and all(len(v) == 1 for v in got.values())
    log = (run_dir / "train.log").read_text()
    assert "process group: gloo, rank 3 of 4" in log and "world=4" in log


def test_elastic_range_continues_on_the_surviving_node(tmp_path, reference, reap):
    """launch/multi_node.sh -N 1:2 -r 1 on two "nodes" of 1 process: the second node (agent and worker) is
    SIGKILLed after the first checkpoint; the first node's agent restarts its worker in a 1-node world, which
    resumes the 2-rank checkpoint on 1 rank (its data-loader readers moved to the one rank) and finishes with
    the uninterrupted 2-rank run's losses (fp32: within 1e-4; gradient accumulation sums in another order)."""
    run_dir, port = tmp_path / "run", free_port()
    args = [str(REPO / "launch/multi_node.sh"), "-N", "1:2", "-n", "1", "-r", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--rdzv-id", "elastic",
            # the restart on one node waits this long for a second one (torchrun's default: 30 s); the first
            # round still gathers both nodes, started 3 s apart, each after its own config check
            "--rdzv-conf", "last_call_timeout=15", *TRAIN_ARGS, "train.collective_timeout_s=20",
            "data.readers=2",  # the range may grow to 2 ranks: it needs 2 readers even when started on one node
            f"hydra.run.dir={run_dir}"]
    env = clean_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    host = start(args, tmp_path / "node0.log", env=env, cwd=REPO)  # first: it hosts the rendezvous store
    time.sleep(3)
    other = start(args, tmp_path / "node1.log", env=env, cwd=REPO)
    wait_for(lambda: complete_checkpoints(run_dir) and max(losses(run_dir)) > complete_checkpoints(run_dir)[-1],
             host, "a step after the first checkpoint")
    killed_after = max(losses(run_dir))
    for pid in worker_pids(other.pid) + [other.pid]:
        os.kill(pid, signal.SIGKILL)
    out = finish(host)
    assert host.returncode == 0, out[-4000:]
    assert killed_after < STEPS, "the kill came too late to interrupt the run"
    log = (run_dir / "train.log").read_text()
    assert "rank 0 of 2" in log and "data: 2 readers saved by 2 data-parallel ranks continue on 1" in log, log[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step, values in got.items():
        assert values[-1] == pytest.approx(reference[step][0], rel=1e-4), (step, values, reference[step])
