"""Signals as schedulers and terminals send them: to the whole process group (the trainer and its DataLoader
workers), before training starts, twice (Ctrl-C Ctrl-C). Every saving signal must end in a checkpoint and
exit code 75, and the resumed run must reproduce the uninterrupted one exactly (CPU, bit for bit)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.jsonl import read_jsonl
from tests.envs import pythonpath

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
STEPS = 16
ARGS = ["experiment=debug", "train.num_threads=1", f"train.max_steps={STEPS}", "checkpoint.every=0",
        "train.eval_every=0", "logging.progress_bar=false", "logging.log_every=1", "data.num_workers=2"]


def records(run_dir):
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def cmd(run_dir, *extra):
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *ARGS, *extra]


def start(run_dir, *extra):
    """In its own session, so that os.killpg reaches the trainer and its DataLoader workers, as torchrun's
    shutdown, SLURM, Kubernetes and a terminal's Ctrl-C do."""
    return subprocess.Popen(cmd(run_dir, *extra), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_step(proc, run_dir, step, timeout=120):
    deadline = time.time() + timeout
    while max(losses(run_dir), default=0) < step:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before step {step}:\n{proc.communicate()[0][-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no step {step} within {timeout} s")
        time.sleep(0.02)


def finish(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # e.g. blocked forever in the DataLoader's queue read
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"did not exit within {timeout} s after the signal:\n{out[-3000:]}")
    return proc.returncode, out


def handles(pid, sig):
    """Whether process pid has a handler for sig (the SigCgt mask of /proc/pid/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def complete_steps(run_dir):
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "COMPLETE").is_file()) \
        if root.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    r = subprocess.run(cmd(d), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = losses(d)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_to_process_group_saves_exits_75_and_resumes_exactly(reference, tmp_path, sig):
    proc = start(tmp_path)
    wait_step(proc, tmp_path, 3)
    os.killpg(proc.pid, getattr(signal, sig))
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]  # the workers ignore the trainer's signals
    stopped = max(losses(tmp_path))
    assert stopped < STEPS, "the signal came too late to interrupt the run"
    assert complete_steps(tmp_path) == [stopped]  # saved at the step it stopped after
    r = subprocess.run(cmd(tmp_path), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses(tmp_path) == reference  # bit for bit


@pytest.mark.slow
def test_signal_before_training_exits_75(tmp_path):
    """A signal during start-up (importing torch, building the model, resuming): train.py installs the handlers
    first thing, so the run does its first step, saves it and exits 75 rather than dying with -15."""
    proc = start(tmp_path)
    deadline = time.time() + 60
    while not (tmp_path / "config.yaml").is_file():  # written before the model is built
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.005)
    assert handles(proc.pid, signal.SIGTERM) and not losses(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    assert complete_steps(tmp_path) == [1], out[-3000:]


def signal_before_the_job_starts(proc, run_dir, sig=signal.SIGTERM):
    """Send sig as soon as train.py handles it, and check that this was before Hydra started the job (its .hydra
    folder): in the seconds when Hydra and torch are imported and the command line is checked."""
    deadline = time.time() + 60
    while not handles(proc.pid, sig):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.001)
    assert not (Path(run_dir) / ".hydra").exists(), "the handler came only with the job"
    os.killpg(proc.pid, sig)


@pytest.mark.slow
def test_signal_during_the_command_line_check_exits_75(tmp_path):
    """train.py catches the default signals in its first lines: a SIGTERM before the config is even read still
    ends in the first step's checkpoint and exit 75 (it died of the signal, exit -15, when the handlers came
    with the job)."""
    proc = start(tmp_path)
    signal_before_the_job_starts(proc, tmp_path)
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    assert "got SIGTERM" in out and complete_steps(tmp_path) == [1], out[-3000:]


@pytest.mark.slow
def test_early_signal_the_config_does_not_save_on_kills(tmp_path):
    """With checkpoint.signals=[SIGUSR1], a SIGTERM caught early gets its default action once the config is read:
    the process dies of it, as it would have without the early handler; nothing is trained or saved."""
    proc = start(tmp_path, "checkpoint.signals=[SIGUSR1]")
    signal_before_the_job_starts(proc, tmp_path)
    code, out = finish(proc)
    assert code == -signal.SIGTERM, out[-3000:]
    assert not losses(tmp_path) and complete_steps(tmp_path) == [], out[-3000:]


@pytest.mark.parametrize("first_during", ["training", "start-up"])
def test_second_sigint_aborts_at_once(tmp_path, first_during):
    """Ctrl-C saves after the step; a second Ctrl-C aborts at once (the process dies of SIGINT), also when the
    first came before the config was read (caught early, then handed over)."""
    start = ("from trainer.signals import StopSignal\n"
             "stop = StopSignal(['SIGTERM', 'SIGINT'])\n"
             "os.kill(os.getpid(), signal.SIGINT)\n") if first_during == "training" else (
             "from trainer.signals import catch_early, hand_over\n"
             "catch_early([])\n"
             "os.kill(os.getpid(), signal.SIGINT)\n"
             "time.sleep(0.2)\n"
             "stop = hand_over(['SIGTERM', 'SIGINT'])\n")
    script = ("import os, signal, sys, time\n" + start +
              "time.sleep(0.2)\n"
              "assert stop.received == 'SIGINT', stop.received\n"
              "print('first', flush=True)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(5)\n"
              "print('still alive', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(ENV, PYTHONPATH=pythonpath()),
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["first"], r.stdout + r.stderr
    assert r.returncode == -signal.SIGINT, r.stdout + r.stderr


@pytest.mark.parametrize("argv,caught", [([], True), (["optim.lr=1e-3"], True), (["-m", "optim.lr=1e-3,2e-3"], False),
                                         (["--multirun"], False), (["--cfg", "job"], False), (["--help"], False),
                                         (["hydra.mode=MULTIRUN"], False)])
def test_early_handlers_only_for_a_run_here(argv, caught):
    """A sweep's submitter (which pickles main() to other processes or SLURM jobs) and --cfg/--help keep the
    default signal actions: an early handler there swallowed SIGTERM and travelled into the jobs."""
    script = ("import os, signal, sys, time\n"
              "from trainer.signals import catch_early, early_signal\n"
              f"catch_early({argv!r})\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(0.2)\n"
              "print('caught', early_signal(), flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(ENV, PYTHONPATH=pythonpath()),
                       capture_output=True, text=True, timeout=60)
    if caught:
        assert r.returncode == 0 and r.stdout.strip() == "caught SIGTERM", r.stdout + r.stderr
    else:
        assert r.returncode == -signal.SIGTERM and not r.stdout, r.stdout + r.stderr


def test_exit_code_75_is_one_number():
    """trainer.signals (no torch import), trainer.checkpoint and launch/torchrun.py each name it."""
    from launch.torchrun import EXIT_PREEMPTED as launcher
    from trainer.checkpoint import EXIT_PREEMPTED as checkpoint
    from trainer.signals import EXIT_PREEMPTED as signals

    assert launcher == checkpoint == signals == 75


def test_exit_code_2_is_one_number():
    """A config error: trainer.preflight names it, launch/torchrun.py (which runs without the trainer's deps) too."""
    from launch.torchrun import EXIT_CONFIG_ERROR as launcher
    from trainer.preflight import EXIT_CONFIG_ERROR as preflight

    assert launcher == preflight == 2
