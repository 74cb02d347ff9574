"""The pre-flight check (trainer/preflight.py): every config problem a user can type is ONE line naming the key,
the value and what is allowed, exit code 2, before anything is built (no tokenizer, model, data, process group
or run directory); a typo is found without importing torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jamba.config import ConfigError
from trainer.preflight import check_command
from tests.envs import pythonpath
from tests.process_tree import run_tree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(tmp_path):
    """A usable corpus and two unusable ones (JSONL without the text field; a non-UTF-8 text file)."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "good.jsonl").write_text('{"text": "hello world"}\n')
    (d / "nofield.jsonl").write_text('{"txt": "a"}\n{"txt": "b"}\n')
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "tok.model").write_bytes(b"not a sentencepiece model")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["hello world"]}), d / "body.parquet")
    (d / "run").mkdir()
    (d / "ds").mkdir()  # a local folder for `datasets` (name: sources)
    (d / "ds" / "train.jsonl").write_text('{"body": "hello world"}\n{"body": "more"}\n')
    (d / "run" / "checkpoints").write_text("not a folder")
    return d


CASES = [  # (overrides, world size, substrings of the one-line message)
    (["optim.lrr=1"], 1, ["optim.lrr=1", "'lrr' is not a key of OptimConfig", "did you mean 'lr'?", "valid keys"]),
    (["+optim.lrr=1"], 1, ["optim.lrr is not a key", "valid keys: ['lr'"]),
    (["optim.lr=abc"], 1, ["optim.lr=abc", "'abc'", "give a number"]),
    (["train.max_steps=1.5"], 1, ["train.max_steps=1.5", "give an integer"]),
    (["model=smal"], 1, ["model='smal' is not a model option", "did you mean 'small'?",
                         "['bench-3b', 'jamba-v0.1', 'small', 'tiny']"]),
    (["experiment=nope"], 1, ["experiment='nope'", "is not an experiment option: choose one of ['bench_3b', 'cpu_demo'"]),
    (["curriculum.stages=[{seq_len: 64, sq: 1}]"], 1, ["'sq' is not a key of StageConfig", "seq_len"]),
    (["optim.lr=[1,2"], 1, ["'optim.lr=[1,2': not a valid override"]),
    (["hydra.run.dir=runs/debug/parallel=fsdp-88a93deb"], 1,
     ["must be quoted for Hydra", "\"hydra.run.dir='runs/debug/parallel=fsdp-88a93deb'\""]),
    (["parallel.tp=3"], 1, ["parallel.tp=3 must divide model.num_attention_heads=4", "choose tp in [1, 2, 4]"]),
    (["parallel.tp=2"], 1, ["tp(2) = 2 != WORLD_SIZE(1)", "launch 2 processes"]),
    (["parallel=ep", "parallel.ep=3"], 2, ["parallel.ep=3 must divide dp_shard(2)"]),
    (["parallel.dp_shard=2"], 4, ["= 2 != WORLD_SIZE(4)", "parallel.dp_shard=-1 (fills to 4; the parallel=fsdp preset does that)"]),
    (["data.num_workers=-1"], 1, ["data.num_workers=-1", "integer >= 0"]),
    (["data.vocab_size=5"], 1, ["data.vocab_size=5", "260..1000000"]),
    (["data.vocab_size=4096"], 1, ["data.vocab_size=4096 is more than model.vocab_size=2048"]),
    (["optim.eps=0"], 1, ["optim.eps=0.0 must be > 0"]),
    (["optim.schedule=linear"], 1, ["optim.schedule='linear' is not allowed", "'cosine'"]),
    (["data.tokenizer=/no/such/tok.model"], 1, ["data.tokenizer='/no/such/tok.model': no such file",
                                                "python -m data.tokenizer train"]),
    (["data.sources=[{path: /no/such/dir/*.jsonl}]"], 1, ["data.sources[0].path='/no/such/dir/*.jsonl' matches no file"]),
    (["data.sources=[{path: CORPUS/good.jsonl, format: csv}]"], 1, ["data.sources[0].format='csv'", "'jsonl'"]),
    (["data.sources=[{path: CORPUS/nofield.jsonl}]"], 1, ["no usable document", "no string field 'text'"]),
    (["data.sources=[{path: CORPUS/latin1.txt}]"], 1, ["no usable document", "not UTF-8"]),
    (["data.tokenizer=CORPUS/tok.model"], 1, ["is not a sentencepiece model"]),
    (["data.sources=[{name: CORPUS/nope_ds}]"], 1, ["data.sources[0].name=", "no such local dataset folder"]),
    (['data.sources=[{name: "~/ds"}]'], 1, ["no such local dataset folder (`~` is not expanded: give the full path)"]),
    (["data.sources=[{name: CORPUS/ds, split: validation}]"], 1, ["`datasets` cannot stream it", "Bad split"]),
    (["data.sources=[{name: CORPUS/ds}]"], 1, ["data.sources[0].text_field='text'", "has a string field 'text' "
                                               "(fields: ['body']); set text_field"]),
    (["data.sources=[{path: CORPUS/body.parquet}]"], 1, ["no usable document", "body.parquet: no column 'text' "
                                                         "(columns: ['body'])"]),
    (["hydra.run.dir=CORPUS/good.jsonl"], 1, ["hydra.run.dir=", "good.jsonl exists and is not a directory",
                                               "give hydra.run.dir a folder of its own"]),
    (["hydra.run.dir=CORPUS/good.jsonl/run"], 1, ["good.jsonl is a file, so", "good.jsonl/run cannot be created"]),
    (["hydra.run.dir=CORPUS/run"], 1, ["run/checkpoints exists and is not a directory", "move it away"]),
    (["data.tokenizer_cache_dir=CORPUS/good.jsonl"], 1, ["data.tokenizer_cache_dir=", "is not a directory",
                                                         "fix: give data.tokenizer_cache_dir a folder"]),
]


@pytest.mark.parametrize("overrides,world,needles", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_config_problems_are_one_line(overrides, world, needles, corpus):
    overrides = [o.replace("CORPUS", str(corpus)) for o in overrides]
    with pytest.raises(ConfigError) as info:
        check_command(overrides, world_size=world)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_a_cache_dir_that_is_a_file_is_named(corpus, monkeypatch):
    monkeypatch.setenv("JAMBA_CACHE_DIR", str(corpus / "good.jsonl"))
    with pytest.raises(ConfigError, match=r"\$JAMBA_CACHE_DIR=.*good.jsonl exists and is not a directory; fix: set "):
        check_command(["experiment=debug"])
    check_command(["experiment=debug", f"data.tokenizer_cache_dir={corpus}/cache"])  # the setting wins; created later


def test_run_dirs_hydra_resolves_at_run_time_are_left_to_it(tmp_path, corpus):
    """A run directory built from Hydra's runtime (${hydra:job.name}, a sweep's ${hydra.job.num}) cannot be known
    before the job starts: not refused (it was, as 'config error: None'); `--cfg` writes nothing: not checked."""
    check_command(["experiment=debug", f"hydra.run.dir={tmp_path}/${{hydra:job.name}}"])
    check_command(["experiment=debug", f"hydra.sweep.dir={tmp_path}/s", "hydra.sweep.subdir=${hydra.job.num}",
                   "optim.lr=1e-3,2e-3"], multirun=True)
    check_command(["experiment=debug", f"hydra.run.dir={corpus}/good.jsonl"], run_dir=False)


def test_a_group_choice_the_experiment_overrides_is_named(capsys):
    """The default experiment (cpu_demo) sets curriculum.stages and train.global_batch_tokens itself, after the
    groups: curriculum=long_context beside it trained 300 steps at 128 tokens without a word. A warning, not an
    error, and only for the curriculum: recipes tune single keys of other groups on purpose for any option."""
    check_command(["curriculum=long_context"], data=False)
    err = capsys.readouterr().err
    assert ("train.py: warning: curriculum=long_context sets train.global_batch_tokens, train.max_steps, "
            "curriculum.stages, but experiment=cpu_demo (composed after the groups) sets them differently, and its "
            "values are used. To use the group's values, drop the recipe ('~experiment'") in err, err
    # without the recipe, with the keys on the command line, or where the recipe agrees: nothing to say
    for cmd in (["~experiment", "curriculum=long_context"],
                ["experiment=gpu_small", "model=small"],  # the recipe's own choice, which it tunes on purpose
                ["experiment=bench_3b", "parallel=ep", "train.global_batch_tokens=32768"],  # tunes any layout
                ["experiment=long_context_2gpu", "curriculum=long_context"],
                ["curriculum=long_context", "train.global_batch_tokens=4194304", "train.max_steps=32000",
                 "curriculum.stages=[{seq_len: 128, micro_batch_size: 8}]"],
                ["experiment=debug", "optim=adamw_wsd", "logging=quiet"]):
        check_command(cmd, data=False, world_size=2 if "parallel=ep" in cmd or "long_context_2gpu" in cmd[0] else 1)
        assert "warning" not in capsys.readouterr().err, cmd


def test_the_override_comparison_leaves_interpolations_and_schema_strings_alone():
    """A group file's ${...} (also inside a list) is resolved elsewhere; a schema that stores a yaml number as a
    string (wandb.project: 2024) did not change it: neither is a recipe's override."""
    from trainer.preflight import _leaves, _same

    tree = {"data": {"sources": [{"path": "${oc.env:ROOT}/*.jsonl"}], "num_workers": 2}}
    assert list(_leaves(tree)) == [("data.num_workers", 2)]
    assert _same("2024", 2024) and _same(["1", "exp"], [1, "exp"]) and not _same("2025", 2024)
    assert _same({"seq_len": 128, "micro_batch_size": 8, "steps": None}, {"seq_len": 128, "micro_batch_size": 8})


def test_good_configs_pass(corpus):
    check_command([])
    check_command(["experiment=debug", f"data.sources=[{{path: {corpus}/good.jsonl}}]", "parallel=fsdp"],
                  world_size=2)
    check_command(["experiment=bench_3b"], world_size=8, data=False)
    check_command(["experiment=debug", f"data.sources=[{{name: {corpus}/ds, text_field: body}}]"])
    # a sweep: every point is checked
    check_command(["experiment=debug", "optim.lr=1e-3,3e-4"], multirun=True)
    with pytest.raises(ConfigError, match="optim.lr=abc"):
        check_command(["experiment=debug", "optim.lr=1e-3,abc"], multirun=True)


def _train(args, cwd, env=None, **kw):
    return run_tree([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, timeout=300,
                    env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


@pytest.mark.parametrize("args", [["optim.lrr=1"], ["--cfg", "job", "model=smal"], ["-m", "optim.lr=1e-3,abc"],
                                  ["data.sources=[{path: missing/*.jsonl}]"]])
def test_train_py_reports_one_line_and_exit_2_before_any_directory(tmp_path, args):
    r = _train(args, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: config error: "), lines
    assert list(tmp_path.iterdir()) == [], "a run that fails validation must leave no directory"


def test_typo_check_does_not_import_torch():
    code = ("import sys\nfrom jamba.config import ConfigError\nfrom trainer.preflight import check_command\n"
            "try:\n    check_command(['optim.lrr=1'])\nexcept ConfigError as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules, 'torch imported for a typo'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": pythonpath()})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'lrr' is not a key of OptimConfig" in r.stdout


def test_preflight_cli_and_launch_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    r = subprocess.run([sys.executable, "-m", "trainer.preflight", "--world-size", "4", "--", "parallel.tp=2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "WORLD_SIZE(4)" in r.stderr, r.stderr
    # launch/single_node.sh checks before torchrun starts: one line, no torchrun failure report
    r = run_tree([str(REPO / "launch/single_node.sh"), "-n", "2", "optim.lrr=1"], cwd=tmp_path, timeout=120, env=env)
    assert r.returncode == 2 and "ChildFailedError" not in r.stderr, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        line for line in r.stderr.splitlines() if "config error: optim.lrr=1" in line]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_under_torchrun_only_rank0_reports(tmp_path):
    r = run_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(REPO / "train.py"), "optim.lrr=1"], cwd=tmp_path, timeout=300,
                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert out.count("config error") == 1, out[-3000:]
    assert "exitcode  : 2" in out  # torchrun's own report of the workers (it cannot be silenced from a worker)
    assert not (tmp_path / "runs").exists()


def test_slurm_submit_checks_the_training_config(tmp_path, monkeypatch, capsys):
    from launch.slurm.__main__ import main as slurm

    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/bash\necho 4242\n")
    fake.chmod(0o755)
    assert slurm(["submit", f"--sbatch={fake}", "nodes=1", "gpus_per_node=2", "--", "model=smal", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model='smal' is not a model option" in err
    assert slurm(["submit", "--dry-run", "nodes=1", "gpus_per_node=2", "--", "parallel.tp=3"]) == 2
    assert "parallel.tp=3 must divide model.num_attention_heads=4" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # nothing written, nothing submitted
    # without sbatch on PATH: one line, exit 2
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slurm(["submit", "nodes=1", "gpus_per_node=1", "--", "model=tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sbatch not found" in err and "--dry-run" in err


def test_warns_when_several_processes_would_train_on_cpu_beside_gpus(monkeypatch, capsys):
    """The default and debug recipes set train.device=cpu: on a GPU node, a launch of several processes with them
    trains on CPU. The check names where the setting came from and the fix; it never fails the run."""
    import torch

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("JAMBA_PREFLIGHT_DONE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    check_command(["experiment=debug", "parallel=ddp"], 2, local_procs=2)
    err = capsys.readouterr().err
    assert "warning: train.device=cpu from the recipe" in err and "these 2 processes train on CPU" in err, err
    assert "experiment=gpu_small" in err
    check_command(["experiment=debug", "parallel=ddp", "train.device=cpu"], 2, local_procs=2)
    assert "train.device=cpu on the command line" in capsys.readouterr().err
    check_command(["experiment=debug"], 1, local_procs=1)  # one process: the CPU demo on a GPU laptop is fine
    check_command(["experiment=debug", "parallel=ddp"], 2)  # submitted from elsewhere (launch.slurm): not here
    monkeypatch.setenv("JAMBA_PREFLIGHT_DONE", "1")  # train.py under a launcher that printed it already
    check_command(["experiment=debug", "parallel=ddp"], 2, local_procs=2)
    monkeypatch.delenv("JAMBA_PREFLIGHT_DONE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_command(["experiment=debug", "parallel=ddp"], 2, local_procs=2)  # no GPUs: CPU is the only choice
    assert "warning" not in capsys.readouterr().err


def test_cuda_runs_need_cuda_and_a_gpu_per_local_process(monkeypatch):
    """train.device=cuda is checked where the training runs (train.py, the launchers: local_procs given), not on a
    SLURM login node (local_procs None)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device=cuda but this machine has no usable CUDA GPU"):
        check_command(["experiment=gpu_small"], 1, local_procs=1)
    check_command(["experiment=gpu_small"], 16)  # submitted from a machine that does not train: not checked
    check_command(["experiment=gpu_small", "train.device=auto"], 1, local_procs=1)  # auto trains on CPU here
    check_command(["experiment=debug"], 1, local_procs=1)  # a CPU run needs no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"4 processes on this machine with train.device=cuda \(CUDA\), but it has 2 "
                                          r"GPU\(s\) \(CUDA_VISIBLE_DEVICES='0,1'\): start at most 2 per machine"):
        check_command(["experiment=gpu_small"], 8, local_procs=4)
    with pytest.raises(ConfigError, match=r"4 processes on this machine with train.device=auto \(CUDA\)"):
        check_command(["experiment=gpu_small", "train.device=auto"], 8, local_procs=4)  # auto picks CUDA here
    check_command(["experiment=gpu_small"], 4, local_procs=2)


def test_train_py_refuses_cuda_without_a_gpu_before_any_directory(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _train(["experiment=gpu_small"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "train.device=cuda but this machine has no usable CUDA GPU" in lines[0], lines
    assert list(tmp_path.iterdir()) == []
    r = _train(["experiment=gpu_small", "--cfg", "job"], tmp_path)  # printing the config needs no GPU
    assert r.returncode == 0 and "name: gpu-small" in r.stdout, r.stderr[-2000:]


def test_a_slurm_sweep_needs_slurm_here(tmp_path, monkeypatch):
    sweep = ["hydra/launcher=slurm_gpu", "experiment=gpu_small", "optim.lr=1e-4,3e-4"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    with pytest.raises(ConfigError, match=r"the sweep's launcher \(hydra_plugins.jamba_launch.TorchSlurmLauncher\) "
                                          r"submits every point as a SLURM job, but sbatch and srun not found on PATH"):
        check_command(sweep, multirun=True)
    # submitit's local launcher also has nodes and tasks_per_node, and needs no SLURM
    assert check_command(["hydra/launcher=submitit_local", "experiment=debug", "optim.lr=1e-3,3e-4"],
                         multirun=True) == [1]
    for tool in ("sbatch", "srun"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    assert check_command(sweep, multirun=True) == [8]  # a login node; slurm_gpu's 1 node x 8 tasks per point
