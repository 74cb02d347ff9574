"""Shell launchers: syntax, shellcheck, dry-run output, and real torchrun runs with a stand-in training script."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("dist_probe.py")
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/slurm/*.sbatch"),
                  *Path(__file__).parent.glob("fake_slurm/*")])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "MASTER_", "NNODES"))}
    env.update(PYTHON=sys.executable, **extra)
    return env


def test_there_are_scripts_to_check():
    names = {p.name for p in SCRIPTS}
    assert {"single_node.sh", "multi_node.sh", "env.sh", "train.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    if script.read_text().startswith("#!/usr/bin/env python"):
        pytest.skip("python stub")
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install -y shellcheck; .ci/run installs it)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if script.read_text().startswith("#!/usr/bin/env python"):
        pytest.skip("python stub")
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
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
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


@pytest.mark.parametrize("args,message", [
    (["-n", "2"], "no rendezvous host"),
    (["--master-addr", "h", "-n", "2"], "number of nodes unknown"),
    (["--hosts", "a,b", "-n", "0"], "--nproc-per-node must be a positive integer"),
    (["--hosts", "a,b", "-N", "x"], "--nnodes must be N or MIN:MAX"),
])
def test_multi_node_errors_say_how_to_fix(args, message):
    res = subprocess.run([str(REPO / "launch/multi_node.sh"), *args, "--dry-run"], env=script_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr


def read_ranks(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(len(list(out_dir.glob("rank*.json"))))]


@pytest.mark.slow
def test_two_nodes_by_two_processes_on_loopback(tmp_path):
    """Two multi_node.sh invocations ("nodes") meet at one c10d rendezvous on 127.0.0.1: 4 ranks, one group."""
    port = free_port()
    env = script_env(TRAIN_SCRIPT=str(PROBE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RDZV_ID="probe")
    cmd = [str(REPO / "launch/multi_node.sh"), "-N", "2", "-n", "2", f"out_dir={tmp_path / 'out'}"]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    ranks = read_ranks(tmp_path / "out")
    assert len(ranks) == 4
    assert all(r["world"] == 4 and r["sum"] == 6.0 for r in ranks)  # all-reduce over all four ranks
    assert sorted((r["GROUP_RANK"], r["LOCAL_RANK"]) for r in ranks) == [("0", "0"), ("0", "1"), ("1", "0"),
                                                                         ("1", "1")]
    assert all(r["NCCL_NVLS_ENABLE"] == "0" and r["OMP_NUM_THREADS"] for r in ranks)


@pytest.mark.slow
def test_max_restarts_restarts_a_failed_worker(tmp_path):
    """Rank 1 fails on the first attempt; torchrun --max-restarts=1 restarts the group, which then succeeds."""
    cmd = [str(REPO / "launch/single_node.sh"), "-n", "2", "-r", "1", f"out_dir={tmp_path / 'out'}", "fail_rank=1"]
    res = subprocess.run(cmd, env=script_env(TRAIN_SCRIPT=str(PROBE)), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    ranks = read_ranks(tmp_path / "out")
    assert [r["TORCHELASTIC_RESTART_COUNT"] for r in ranks] == ["1", "1"] and ranks[0]["sum"] == 1.0
    # without restarts the same failure fails the launch
    cmd[4] = "0"
    res = subprocess.run(cmd, env=script_env(TRAIN_SCRIPT=str(PROBE)), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
