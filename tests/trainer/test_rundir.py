"""Run directory names (trainer/rundir.py): deterministic, safe for any value, unchanged by the keys that do not
define the run; and through train.py: a rerun resumes, a larger train.max_steps extends the same run, the start
says whether it resumes, sweep points are not nested in another run's directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.rundir import BASE_LEAF, run_leaf

REPO = Path(__file__).resolve().parents[2]
SAFE = re.compile(r"^[A-Za-z0-9._=,-]+$")


def test_leaf_is_deterministic_and_order_free():
    a = run_leaf(["model=small", "optim.lr=1e-3"])
    assert a == run_leaf(["optim.lr=1e-3", "model=small"]) == run_leaf(["optim.lr=0.001", "model=small"])
    assert a.startswith("model=small,optim.lr=0.001-") and re.fullmatch(r".*-[0-9a-f]{8}", a)
    assert run_leaf(["optim.lr=3e-4", "model=small"]) != a
    assert run_leaf([]) == BASE_LEAF


@pytest.mark.parametrize("override", [
    "data.sources=[{path: /data/web/*.jsonl, weight: 3.0}, {path: /data/code/**/*.parquet, text_field: content}]",
    "data.tokenizer=../tok/../../x y.model", "model.layer_pattern='MD ME AD ME'", "name=a/b", "data.tokenizer=/",
    "data.sources=[{path: " + "/very/long/path" * 30 + "}]",
])
def test_leaf_is_one_safe_path_component(override):
    leaf = run_leaf([override, "optim.lr=1e-3"])
    assert SAFE.match(leaf) and "/" not in leaf and leaf not in (".", "..") and len(leaf) <= 90, leaf


def test_values_that_sanitise_alike_still_differ():
    assert run_leaf(["data.tokenizer=a/b.model"]) != run_leaf(["data.tokenizer=a_b.model"])
    long = "data.sources=[{path: /x/" + "y" * 200 + "%d}]"
    assert run_leaf([long % 1]) != run_leaf([long % 2])


def test_operational_keys_do_not_change_the_run():
    base = ["model=small", "data.num_workers=2"]
    leaf = run_leaf(base)
    for extra in ["train.max_steps=12", "checkpoint.signals=[SIGTERM]", "checkpoint.every=5", "checkpoint.overwrite=true", "logging.log_every=1",
                  "logging.wandb.mode=offline", "logging=quiet", "hydra.run.dir=x", "train.device=cpu",
                  "train.num_threads=1", "train.compile=false", "train.eval_every=0", "name=other",
                  "experiment=debug", "data.prefetch_factor=8", "hydra/launcher=slurm_gpu"]:
        assert run_leaf([*base, extra]) == leaf, extra
    for extra in ["data.num_workers=3", "optim.lr=1e-3", "parallel=fsdp", "train.seed=1", "curriculum=long_context",
                  "~data.tokenizer", "train.global_batch_tokens=8192"]:
        assert run_leaf([*base[:1], extra] if extra.startswith("data.num") else [*base, extra]) != leaf, extra


def _train(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_rerun_resumes_and_extends_the_same_directory(tmp_path):
    common = ["experiment=debug", "train.eval_every=0", "data.num_workers=0"]
    r = _train([*common, "train.max_steps=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dirs = list((tmp_path / "runs" / "debug").iterdir())
    assert len(dirs) == 1 and dirs[0].name == run_leaf(["data.num_workers=0"]), dirs
    run_dir = dirs[0]
    assert f"run directory {run_dir}: starting fresh" in r.stdout + r.stderr
    # extend the finished run, with operational changes: same directory, resumes from its checkpoint
    r = _train([*common, "train.max_steps=4", "checkpoint.signals=[SIGTERM]", "logging.progress_bar=false"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "runs" / "debug").iterdir()) == [run_dir]
    assert f"run directory {run_dir}: resuming from {run_dir / 'checkpoints' / 'step_000000002'} (step 2 of 4)" \
        in r.stdout + r.stderr
    assert "setting(s) of" not in r.stdout + r.stderr  # operational keys only: no warning
    assert _steps(run_dir) == [1, 2, 3, 4]
    # a sweep point with the same overrides is that same run (already at step 4: nothing to do), and the other
    # point gets its own directory beside it, never inside it
    r = _train(["-m", *common, "train.max_steps=4", "optim.lr=3e-3,1e-3"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "runs" / "debug").iterdir() if p.is_dir())
    other = run_leaf(["data.num_workers=0", "optim.lr=1e-3"])
    assert names == sorted([run_dir.name, other, run_leaf(["data.num_workers=0", "optim.lr=3e-3"])])
    assert not any(p.is_dir() and p.name not in ("checkpoints", ".hydra") for p in run_dir.iterdir())
    assert _steps(tmp_path / "runs" / "debug" / other) == [1, 2, 3, 4]
    # another recipe forced into this run's directory (its name given by hand): it resumes, and says what changed
    r = _train(["experiment=cpu_demo", "name=debug", "train.eval_every=0", "data.num_workers=0", "train.max_steps=21"],
               tmp_path)  # (cpu_demo warms up for 20 steps)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "resuming from" in out and "this start changes" in out and "previous start" in out, out[-3000:]
    assert "train.global_batch_tokens: 256 -> 4096" in out and "optim.warmup_steps" in out


def test_config_changes_name_what_a_restart_changes():
    from trainer.rundir import config_changes

    old = {"name": "a", "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "train": {"max_steps": 10, "seed": 1},
           "logging": {"log_every": 10}, "model": {"vocab_size": 2048}}
    new = {"name": "b", "optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "train": {"max_steps": 20, "seed": 1},
           "logging": {"log_every": 1}, "model": {"vocab_size": 2048, "extra": True}}
    assert config_changes(old, new) == ["model.extra: '(unset)' -> True", "optim.betas: [0.9, 0.95] -> [0.9, 0.99]",
                                        "optim.lr: 0.001 -> 0.0003"]  # name, max_steps, logging: a restart may
    assert config_changes(old, old) == []
    # what a resume may change on purpose: the layout (hydra.run.dir=... on another layout), workers, timeouts
    assert config_changes({"parallel": {"dp_shard": 2}, "data": {"num_workers": 1}, "train": {"gc_freeze": True}},
                          {"parallel": {"dp_shard": -1}, "data": {"num_workers": 4}, "train": {"gc_freeze": False}}) == []


def test_a_failed_start_names_its_change_and_leaves_the_config(tmp_path):
    """A change that breaks the restore (a model shape) is named before the error, and config.yaml keeps describing
    the start that ran, so the next start with the original settings compares with it and says nothing."""
    import yaml

    run = tmp_path / "r"
    common = ["experiment=debug", "train.eval_every=0", "data.num_workers=0", f"hydra.run.dir={run}"]
    assert _train([*common, "train.max_steps=2"], tmp_path).returncode == 0
    r = _train([*common, "train.max_steps=3", "model.vocab_size=4096"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "model.vocab_size: 2048 -> 4096" in out, out[-3000:]
    assert "does not fit this model: model.model.embed_tokens.weight is torch.Size([2048, 64]) there and " \
           "torch.Size([4096, 64]) here" in out and "Traceback" not in out, out[-3000:]  # one line, not DCP's
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vocab_size"] == 2048
    r = _train([*common, "train.max_steps=3"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "this start changes" not in r.stdout + r.stderr

def test_a_resume_into_other_layers_is_refused_in_one_line(tmp_path):
    """Tensors the checkpoint lacks (more layers) or holds beyond the model (fewer layers: DCP ignored them, and the
    resume dropped two trained layers silently) are named in one line, exit 2; the checkpoint stays."""
    run = tmp_path / "r"
    common = ["experiment=debug", "train.eval_every=0", "data.num_workers=0", f"hydra.run.dir={run}"]
    assert _train([*common, "train.max_steps=2"], tmp_path).returncode == 0
    for layers, says in ((2, "the checkpoint has model.model.layers.2."), (8, "this model has model.model.layers.4.")):
        r = _train([*common, "train.max_steps=3", f"model.num_hidden_layers={layers}"], tmp_path)
        out = r.stdout + r.stderr
        assert r.returncode == 2 and f"model.num_hidden_layers: 4 -> {layers}" in out, out[-3000:]
        assert "does not fit this model: " + says in out and "Traceback" not in out, out[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000002"]
