"""train.sharded_init through train.py (2 CPU ranks, gloo): initialising after sharding gives the same run as
initialising the whole model first (parallel/init.py's "full" mode is exact below 8 GiB), and the default
(null) picks sharded init only for models too large to materialise whole."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from jamba.config import get_preset
from jamba.model import JambaForCausalLM
from tests.process_tree import run_tree
from trainer.build import auto_sharded_init
from tests.envs import pythonpath

ROOT = Path(__file__).resolve().parents[2]


def test_auto_sharded_init_picks_large_models():
    with torch.device("meta"):
        big, tiny = JambaForCausalLM(get_preset("jamba-v0.1")), JambaForCausalLM(get_preset("tiny"))
    assert auto_sharded_init(big, torch.device("cpu")) and not auto_sharded_init(tiny, torch.device("cpu"))


def _losses(run_dir: Path, layout: str, sharded: str) -> list:
    """Losses of a 3-step 2-rank run; checks that parallel.init_weights ran exactly when sharded_init=true."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "experiment=debug", f"parallel={layout}", "train.max_steps=3", "train.eval_every=0", "checkpoint.every=0",
           "checkpoint.save_final=false", f"train.sharded_init={sharded}", f"hydra.run.dir={run_dir}"]
    r = run_tree(cmd, cwd=ROOT, env=env, timeout=150)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    sharded_log = "sharded parameters" in (run_dir / "train.log").read_text()  # parallel/init.py's line
    assert sharded_log == (sharded == "true"), f"train.sharded_init={sharded}: parallel.init_weights ran: {sharded_log}"
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["fsdp", "ep"])
def test_sharded_init_trains_as_the_whole_model_init(tmp_path, layout):
    whole, sharded = _losses(tmp_path / "whole", layout, "false"), _losses(tmp_path / "sharded", layout, "true")
    assert len(whole) == 3 and sharded == whole
    assert _losses(tmp_path / "default", layout, "null") == whole  # the tiny model: initialised whole
