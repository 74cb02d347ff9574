"""Shell launchers: syntax, shellcheck, dry-run output and argument errors (runs with train.py: test_e2e_train.py)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.envs import pythonpath

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/slurm/*.sbatch")])


def script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMP_", "MASTER_", "NNODES", "RDZV_", "HOSTS"))}
    env.update(PYTHON=sys.executable, **extra)
    return env


def test_there_are_scripts_to_check():
    names = {p.name for p in SCRIPTS}
    assert {"single_node.sh", "multi_node.sh", "env.sh", "train.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install -y shellcheck; .ci/run installs it)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    res = subprocess.run(["shellcheck", "-x", str(script.relative_to(REPO))], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_single_node_dry_run():
    res = subprocess.run([str(REPO / "launch/single_node.sh"), "-n", "4", "-r", "2", "--dry-run", "model=tiny",
                          "hydra.run.dir=runs/x"], env=script_env(), capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    assert "NCCL_NVLS_ENABLE=0" in lines and "TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in lines
    assert f"OMP_NUM_THREADS={max(1, len(os.sched_getaffinity(0)) // 4)}" in lines
    cmd = lines[-1].split()
    assert cmd[:3] == [sys.executable, "-m", "launch.torchrun"]
    assert cmd[3:7] == ["--standalone", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=2"]
    assert cmd[7:] == [str(REPO / "train.py"), "model=tiny", "hydra.run.dir=runs/x"]


def test_multi_node_dry_run_takes_master_from_hosts_and_env():
    run = [str(REPO / "launch/multi_node.sh"), "--hosts", "gpu01,gpu02,gpu03", "-n", "8", "--dry-run", "model=small"]
    cmd = subprocess.run(run, env=script_env(), capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert "--nnodes=3 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu01:29500 --rdzv-id=jamba" in cmd
    env = script_env(MASTER_ADDR="10.0.0.7", MASTER_PORT="1234", NNODES="2:4", RDZV_ID="exp7")
    cmd = subprocess.run([str(REPO / "launch/multi_node.sh"), "-n", "2", "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert "--nnodes=2:4 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.7:1234 --rdzv-id=exp7" in cmd
    assert "--rdzv-conf" not in cmd  # torchrun's own rendezvous settings unless asked for


@pytest.mark.parametrize("args,env,expect", [
    (["--rdzv-conf", "last_call_timeout=5,join_timeout=900"], {}, "--rdzv-conf=last_call_timeout=5,join_timeout=900"),
    ([], {"RDZV_CONF": "last_call_timeout=5"}, "--rdzv-conf=last_call_timeout=5"),
    ([], {"RDZV_CONF": ""}, None),
    (["--rdzv-conf", ""], {"RDZV_CONF": "last_call_timeout=5"}, None),  # an exported value, cleared for one launch
])
def test_multi_node_forwards_rendezvous_settings(args, env, expect):
    run = [str(REPO / "launch/multi_node.sh"), "-N", "1:2", "-n", "1", "--master-addr", "h", *args, "--dry-run"]
    cmd = subprocess.run(run, env=script_env(**env), capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert (expect in shlex.split(cmd)) if expect else "--rdzv-conf" not in cmd, cmd  # (printed with %q)


@pytest.mark.parametrize("args,message", [
    (["-n", "2"], "no rendezvous host"),
    (["--master-addr", "h", "-n", "2"], "number of nodes unknown"),
    (["--hosts", "a,b", "-n", "0"], "--nproc-per-node must be a positive integer"),
    (["--hosts", "a,b", "-N", "x"], "--nnodes must be N or MIN:MAX"),
    (["--hosts", "a,b", "-N", "3:1"], "--nnodes MIN:MAX needs MIN <= MAX, got '3:1'"),
    (["--hosts", "a,b", "--rdzv-conf", "last_call_timeout"], "--rdzv-conf must be KEY=VALUE[,KEY=VALUE...]"),
])
def test_multi_node_errors_say_how_to_fix(args, message):
    res = subprocess.run([str(REPO / "launch/multi_node.sh"), *args, "--dry-run"], env=script_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr


def test_multi_node_checks_every_size_of_an_elastic_range():
    """-N 1:3 -n 2 may run with 2, 4 or 6 processes: a global batch that 6 cannot split fails before torchrun."""
    res = subprocess.run([str(REPO / "launch/multi_node.sh"), "-N", "1:3", "-n", "2", "--master-addr", "127.0.0.1",
                          "experiment=debug", "parallel=ddp", "train.global_batch_tokens=512"], env=script_env(),
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "with 6 processes (the elastic range allows [2, 4, 6]): curriculum.stages[0]" in res.stderr
    # a range that may grow needs as many data readers as its largest data-parallel size
    res = subprocess.run([str(REPO / "launch/multi_node.sh"), "-N", "1:2", "-n", "2", "--master-addr", "127.0.0.1",
                          "experiment=debug", "parallel=ddp", "train.global_batch_tokens=512"], env=script_env(),
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert ("may restart with 4 data-parallel ranks, each needing one of the data readers fixed when the run starts, "
            "but data.readers=0 gives 2 (data-parallel ranks x data.num_workers) when it starts with 2 processes; "
            "fix: data.readers=4") in res.stderr


def test_torchrun_wrapper_sets_the_shutdown_timeout():
    """launch.torchrun (used by train.sbatch on torch < 2.12) makes torchrun wait this long before SIGKILL."""
    code = ("import os; os.environ['TORCH_ELASTIC_SHUTDOWN_TIMEOUT'] = '240'\n"
            "from launch.torchrun import patch_shutdown_timeout\n"
            "from torch.distributed.elastic.multiprocessing import api\n"
            "assert patch_shutdown_timeout(240) and api.PContext.close.__defaults__[-1] == 240\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_torchrun_wrapper_passes_a_config_error_on_in_one_line(tmp_path):
    """A rank that stops on a config error (exit 2: here the rank's own pre-flight check; in practice a checkpoint
    that does not fit the model) ends launch.torchrun with exit 2 and one line, not torchrun's traceback."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath())
    res = subprocess.run([sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=2",
                          str(REPO / "train.py"), "optim.lrr=1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "Root Cause" not in out, out[-3000:]
    assert out.count("config error: optim.lrr=1") == 1, out[-3000:]
    assert "launch.torchrun: rank(s) 0 exited 2, a config or usage error: see the message above" in out, out[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_torchrun_wrapper_calls_it_a_config_error_only_when_every_failure_is_one():
    from launch.torchrun import config_error_ranks

    assert config_error_ranks({0: 2, 1: -15}) == [0]  # rank 1 stopped by torchrun after rank 0 failed
    assert config_error_ranks({0: 2, 1: 2, 2: -9}) == [0, 1]  # SIGKILL after the shutdown timeout
    assert config_error_ranks({0: 2, 1: 1}) == []  # a crash beside it keeps torchrun's summary
    assert config_error_ranks({0: 2, 1: -11}) == []  # a segfault is a failure of its own
    assert config_error_ranks({0: -15}) == [] and config_error_ranks({}) == []
