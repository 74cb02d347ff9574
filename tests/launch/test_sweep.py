"""Sweeps on SLURM through Hydra's submitit launcher: SLURM -> torchrun environment, the slurm_gpu preset,
and a sweep on a fake SLURM (stub sbatch/srun/scontrol/sacct on PATH) with a preempted, requeued point."""

import json
import os
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from launch.sweep import expand_hostlist, is_preempted_exit, torch_env_from_slurm
from tests.process_tree import run_tree

REPO = Path(__file__).resolve().parents[2]
FAKE_SLURM = Path(__file__).with_name("fake_slurm")
APP = Path(__file__).with_name("sweep_app") / "app.py"


@pytest.mark.parametrize("nodelist,hosts", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],b1,c[2]-ib", ["a8", "a9", "a10", "b1", "c2-ib"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_torch_env_from_slurm_task():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert torch_env_from_slurm(env) == {
        "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(29500 + 456)}
    assert torch_env_from_slurm(env, master_port=12345)["MASTER_PORT"] == "12345"
    assert torch_env_from_slurm({}) == {}  # not in a SLURM step: leave the environment alone


def test_preemption_is_recognised_by_exit_code():
    assert is_preempted_exit(SystemExit(75), 75)
    assert not is_preempted_exit(SystemExit(1), 75) and not is_preempted_exit(SystemExit(0), 0)
    assert not is_preempted_exit(None, 75) and not is_preempted_exit(RuntimeError("x"), 75)


def test_preset_composes_with_train_config():
    from trainer.config import register_configs

    register_configs()  # train.py's structured schemas (run_schema, ...)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.nodes=2",
                                           "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.jamba_launch.TorchSlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node) == (2, 4)  # one task per GPU = one rank
    assert launcher.additional_parameters.signal == "USR1@300" and launcher.additional_parameters.requeue
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_sweep_on_fake_slurm_one_multi_rank_job_per_point_and_requeue(tmp_path):
    """`-m hydra/launcher=slurm_gpu lr=0.1,0.2`: each point is one 2-rank job (one process group of 2) in its
    own directory; the lr=0.2 point exits with the preemption code on its first attempt, rank 0 requeues
    it, and the requeued job finishes the same point in the same directory."""
    sweep_dir, slurm_log = tmp_path / "sweep", tmp_path / "slurm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PATH=f"{FAKE_SLURM}:{env['PATH']}", FAKE_SLURM_DIR=str(tmp_path / "state"),
               FAKE_SLURM_LOG=str(slurm_log), FAKE_SLURM_FIRST_JOB_ID=str(random.randrange(1000, 9000, 10)),
               WANDB_MODE="disabled")
    cmd = [sys.executable, str(APP), "-m", "hydra/launcher=slurm_gpu", f"hydra.searchpath=[file://{REPO}/conf]",
           "hydra.launcher.gpus_per_node=2", f"hydra.sweep.dir={sweep_dir}", "lr=0.1,0.2", "preempt_lr=0.2"]
    res = run_tree(cmd, env=env, cwd=tmp_path, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    points = {}
    for point in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        ranks = [json.loads((point / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["RANK"] for r in ranks] == ["0", "1"] and all(r["WORLD_SIZE"] == "2" for r in ranks)
        assert all(r["sum"] == 1.0 and r["NCCL_NVLS_ENABLE"] == "0" for r in ranks)  # one group of 2 ranks
        assert len({r["SLURM_JOB_ID"] for r in ranks}) == 1
        points[ranks[0]["lr"]] = ranks[0]
    assert sorted(points) == [0.1, 0.2]  # two points, two directories
    assert points[0.1]["restart"] == 0 and points[0.2]["restart"] == 1
    assert slurm_log.read_text().split() == ["requeue", points[0.2]["SLURM_JOB_ID"]]

    scripts = list((sweep_dir / ".submitit").glob("*submission*.sh"))  # submitit keeps the array's script
    assert len(scripts) == 1, scripts
    script = scripts[0].read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --signal=USR1@300" in script and "#SBATCH --requeue" in script and "USR2" not in script
    assert f"export PYTHONPATH={REPO}" in script
