"""sbatch rendering from SlurmJob configs: header lines, parameters, body, validation, CLI, dry-run."""

import shutil
import subprocess
from pathlib import Path

import pytest

from launch.slurm import SlurmJob, load_job, render_sbatch, time_limit_seconds
from launch.slurm.__main__ import main as cli
from launch.slurm.render import HEADER_END, REPO_ROOT, TEMPLATE

CWD = Path("/submit/here")


def header(script: str) -> list[str]:
    return [line for line in script.split(HEADER_END)[0].splitlines() if line.startswith("#SBATCH")]


def params(script: str) -> list[str]:
    block = script.split(HEADER_END)[1].split("set -euo pipefail")[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_default_job_renders_expected_header_and_parameters():
    script = render_sbatch(SlurmJob(), cwd=CWD)
    assert script.startswith("#!/bin/bash\n")
    assert header(script) == [
        "#SBATCH --job-name=jamba",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=24:00:00",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/submit/here/logs/slurm/%x-%j.out",
    ]
    assert params(script) == [
        f"REPO_DIR={REPO_ROOT}",
        "RUN_DIR=/submit/here/runs/jamba",
        "PROCS_PER_NODE=8",
        "MAX_RESTARTS=0",
        "MAX_REQUEUES=100",
        "SHUTDOWN_TIMEOUT=240",
        "PYTHON=python",
        "RDZV_PORT=''",
        "RDZV_CONF=''",
        "set --",
    ]
    # The template's body follows verbatim.
    assert script.endswith(TEMPLATE.read_text().split(HEADER_END, 1)[1])


def test_multi_node_job_with_every_option():
    job = SlurmJob(job_name="jamba-3b.sweep_1", nodes=4, gpus_per_node=8, cpus_per_task=96, mem="0",
                   time="2-00:00:00", partition="gpu", account="proj-42", qos="high", constraint="h100",
                   exclusive=True, signal_lead_s=600, shutdown_timeout_s=420, max_restarts=2, max_requeues=5,
                   rdzv_port=29400, rdzv_conf="join_timeout=1800,read_timeout=120", run_dir="/scratch/runs/3b", log_dir="/scratch/logs", repo_dir="/opt/jamba",
                   python="/opt/venv/bin/python", setup=["module load cuda/12.8"],
                   env={"NCCL_SOCKET_IFNAME": "ib0", "WANDB_PROJECT": "jamba 3b"},
                   extra_sbatch=["--mail-type=END", "--reservation=big"],
                   train_args=["model=bench-3b", "optim.lr=3e-4", "data.name=my corpus"])
    script = render_sbatch(job, cwd=CWD)
    assert header(script) == [
        "#SBATCH --job-name=jamba-3b.sweep_1",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --mem=0",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/scratch/logs/%x-%j.out",
        "#SBATCH --mail-type=END",
        "#SBATCH --reservation=big",
    ]
    assert params(script) == [
        "REPO_DIR=/opt/jamba",
        "RUN_DIR=/scratch/runs/3b",
        "PROCS_PER_NODE=8",
        "MAX_RESTARTS=2",
        "MAX_REQUEUES=5",
        "SHUTDOWN_TIMEOUT=420",
        "PYTHON=/opt/venv/bin/python",
        "RDZV_PORT=29400",
        "RDZV_CONF=join_timeout=1800,read_timeout=120",
        "export NCCL_SOCKET_IFNAME=ib0",
        "export WANDB_PROJECT='jamba 3b'",
        "cd /opt/jamba",
        "module load cuda/12.8",
        "set -- model=bench-3b optim.lr=3e-4 'data.name=my corpus'",
    ]


def test_body_has_rendezvous_signal_trap_and_requeue():
    body = TEMPLATE.read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in body
    assert "--rdzv-backend=c10d" in body and '--rdzv-endpoint="$head_node:$RDZV_PORT"' in body
    assert "trap 'forward USR1' USR1" in body and "trap 'forward TERM' TERM" in body
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body
    assert 'hydra.run.dir="$RUN_DIR"' in body  # fixed per job name, so the requeued job resumes it
    assert "srun --ntasks-per-node=1" in body


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("1:30", 90), ("1:30:00", 5400), ("2-00", 172800),
                                          ("1-12:30", 131400), ("1-00:00:10", 86410)])
def test_time_limit_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("overrides,match", [
    (["nodes=0"], "nodes=0"),
    (["job_name=my run"], "job_name"),
    (["time=tomorrow"], "time='tomorrow'"),
    (["time=00:04:00"], "signal_lead_s=300 is not shorter"),
    (["shutdown_timeout_s=300"], "shutdown_timeout_s=300"),
    (["extra_sbatch=[mail-type=END]"], "extra_sbatch"),
    (["nodez=2"], "nodez"),
    (["nodes=two"], "nodes"),
    (["rdzv_conf=join_timeout"], "rdzv_conf='join_timeout' must be KEY=VALUE"),
    (["rdzv_conf=a=1 b=2"], "rdzv_conf"),
])
def test_bad_settings_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        render_sbatch(load_job(overrides))


def test_yaml_time_is_read_literally(tmp_path):
    # YAML 1.1 would read 12:00:00 as 43200 (base 60), which SLURM would take as 30 days.
    cfg = tmp_path / "job.yaml"
    cfg.write_text("nodes: 2\ntime: 12:00:00\ntrain_args: [model=small]\n")
    job = load_job(["gpus_per_node=4"], cfg)
    assert (job.nodes, job.gpus_per_node, job.time, job.train_args) == (2, 4, "12:00:00", ["model=small"])
    assert load_job(["time=1:00:00"], cfg).time == "1:00:00"


def test_cli_render_splits_job_settings_from_train_overrides(capsys):
    assert cli(["render", "nodes=2", "time=1:00:00", "--", "model=tiny", "trainer.steps=10"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in header(script) and "#SBATCH --time=1:00:00" in header(script)
    assert "set -- model=tiny trainer.steps=10" in params(script)
    assert cli(["render", "model=tiny"]) == 2  # a train.py override before `--` is an error, not ignored
    assert "train.py overrides go after `--`" in capsys.readouterr().err


def test_dry_run_prints_script_commands_and_environment(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # an exported value wins over CPUs / ranks (by design)
    assert cli(["submit", "--dry-run", "--no-check", "nodes=2", "gpus_per_node=4", "cpus_per_task=32", "job_name=dry",
                "--", "model=tiny"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "sbatch --parsable" in out
    # the environment and the srun/torchrun command come from the rendered script's own dry-run branch
    assert "NCCL_NVLS_ENABLE=0" in out and "TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in out
    assert "OMP_NUM_THREADS=8" in out  # 32 CPUs / 4 ranks per node
    assert "WORLD_SIZE=8" in out
    srun_line = next(line for line in out.splitlines() if line.startswith("srun "))
    for piece in ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29734",
                  "--rdzv-id=1234-0", "train.py", "model=tiny", "hydra.run.dir=" + str(Path.cwd() / "runs/dry")]:
        assert piece in srun_line
    assert "scontrol requeue 1234" in out
    assert "--rdzv-conf" not in srun_line  # torchrun's own rendezvous settings unless asked for
    monkeypatch.setenv("RDZV_CONF", "last_call_timeout=5")  # exported for multi_node.sh: not for this job
    monkeypatch.setenv("RDZV_PORT", "1")
    assert cli(["submit", "--dry-run", "--no-check", "--", "model=tiny"]) == 0
    srun_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("srun "))
    assert "--rdzv-conf" not in srun_line and ":1 " not in srun_line
    assert cli(["submit", "--dry-run", "--no-check", "rdzv_conf=join_timeout=1800", "--", "model=tiny"]) == 0
    srun_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("srun "))
    assert "--rdzv-conf=join_timeout=1800" in srun_line.split()


def test_dry_run_does_not_run_setup_lines_here(tmp_path, capsys):
    # setup lines are for the nodes (module load, venv activation): the dry run shows them but runs none
    marker = tmp_path / "SETUP_RAN"
    assert cli(["submit", "--dry-run", "--no-check", "nodes=1", "gpus_per_node=1",
                f"setup=[touch {marker},module load cuda/12]", "--", "model=tiny"]) == 0
    captured = capsys.readouterr()
    assert not marker.exists()
    assert f"touch {marker}" in captured.out and "module load cuda/12" in captured.out
    assert "command not found" not in captured.out + captured.err
    assert "the 2 setup line(s) were not run here" in captured.out


@pytest.mark.parametrize("args, match", [
    (["--config", "/nonexistent/job.yaml"], "--config /nonexistent/job.yaml: No such file or directory"),
    (["--config", "{bad_yaml}"], "is not valid YAML"),
    (["nodes=0", "--", "model=tiny"], "nodes=0 must be >= 1"),  # not the training check's 'WORLD_SIZE(0)'
    (["gpus_per_node=0", "--", "model=tiny"], "gpus_per_node=0 must be >= 1"),
])
def test_cli_refuses_bad_job_in_one_line(args, match, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("nodes: [\n")
    assert cli(["submit", "--dry-run", *[a.format(bad_yaml=bad_yaml) for a in args]]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err


def test_submit_writes_script_and_calls_sbatch(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls"
    fake = tmp_path / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert cli(["submit", f"--sbatch={fake}", "--no-check", "job_name=sub", "nodes=2", "--", "model=tiny"]) == 0
    args = calls.read_text().split()
    assert args[0] == "--parsable" and args[1].startswith(str(tmp_path / "logs/slurm/sub-"))
    assert Path(args[1]).read_text() == render_sbatch(load_job(["job_name=sub", "nodes=2",
                                                                 "train_args=[model=tiny]"]))
    assert "submitted job 4242" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install -y shellcheck; .ci/run installs it)")
def test_rendered_scripts_pass_shellcheck(tmp_path):
    for i, job in enumerate([SlurmJob(), SlurmJob(nodes=8, cpus_per_task=64, env={"A": "b c"}, rdzv_conf="join_timeout=900",
                                                  train_args=["model=small", "x='y z'"])]):
        path = tmp_path / f"job{i}.sbatch"
        path.write_text(render_sbatch(job))
        res = subprocess.run(["shellcheck", "-x", str(path)], cwd=REPO_ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
