"""train.py resumed on another number of ranks continues the data stream (CPU, gloo, FSDP2, the tiny model).

The reference is the uninterrupted run: its step-4 checkpoint is copied into a fresh run directory and
resumed there on the other number of ranks to step 8. Each of the run's readers (data/readers.py) must end
exactly where it ends in the uninterrupted run (same documents, shuffle buffers, counters), every resumed
step must train on the same tokens, and the losses must follow the reference (fp32: only the order of the
gradient sums differs, data-parallel ranks against gradient accumulation).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from data.loader import merge_loader_states
from tests.envs import pythonpath
from tests.process_tree import run_tree

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
COMMON = ["experiment=debug", "parallel=fsdp", "train.eval_every=0", "checkpoint.every=4", "train.max_steps=8",
          "train.collective_timeout_s=60"]


def train(run_dir: Path, ranks: int, *overrides: str, expect: int = 0, launcher: str = "") -> str:
    """train.py on `ranks` processes: torchrun, or plain python for one unless launcher="torchrun"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": pythonpath()}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 or launcher == "torchrun" else [sys.executable])
    r = run_tree(launcher + ["train.py", *COMMON, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                 timeout=150)
    assert r.returncode == expect, (r.returncode, (r.stdout + r.stderr)[-4000:])
    return r.stdout + r.stderr


def resumed_copy(ref: Path, dst: Path) -> Path:
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_000000004", dst / "checkpoints" / "step_000000004")
    return dst


def readers_at_8(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints" / "step_000000008"
    states = [torch.load(f, weights_only=False)["data"]["loader"] for f in sorted(ckpt.glob("rank*.pt"))]
    return merge_loader_states(states)["readers"]


def metrics(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


def assert_continues(ref: Path, got: Path, rel: float = 1e-4) -> None:
    a, b = metrics(ref), metrics(got)
    assert sorted(b) == [5, 6, 7, 8]
    for s in b:
        assert b[s]["tokens"] == a[s]["tokens"]
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=rel), (s, a[s]["loss"], b[s]["loss"])
    ra, rb = readers_at_8(ref), readers_at_8(got)  # (of every rank file: tensor-parallel ranks hold equal ones)
    assert sorted(ra) == sorted(rb) == [0, 1]
    assert ra == rb  # every reader's whole position: sources, shuffle buffer, packing remainder, counters


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                       reason="needs 2 GPUs")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_two_ranks_resume_on_one_and_one_on_two(tmp_path, device):
    """On CUDA (NCCL, bf16 autocast) the losses are compared within 1e-3."""
    dev, rel = ((), 1e-4) if device == "cpu" else (("train.device=cuda",), 1e-3)
    ref2 = tmp_path / "two"
    train(ref2, 2, *dev)
    one = resumed_copy(ref2, tmp_path / "two_then_one")
    log = train(one, 1, *dev, launcher="torchrun")
    assert "data: 2 readers saved by 2 data-parallel ranks continue on 1" in log, log[-3000:]
    assert "resumed on a world of 1 (the checkpoint's: 2): RNG streams seeded from (train.seed, step" in log, log[-3000:]
    assert_continues(ref2, one, rel)

    ref1 = tmp_path / "one"  # one rank with two readers (data.readers=2): it can grow to two ranks
    train(ref1, 1, "data.readers=2", *dev)
    two = resumed_copy(ref1, tmp_path / "one_then_two")
    train(two, 2, "data.readers=2", *dev)
    assert_continues(ref1, two, rel)
    # the same training on 1 and on 2 ranks: data.readers=2 makes one rank read what two would
    a, b = metrics(ref1), metrics(ref2)
    assert [b[s]["loss"] == pytest.approx(a[s]["loss"], rel=rel) for s in a] == [True] * 8


def test_tensor_parallel_to_one_rank(tmp_path):
    """2 ranks of one data-parallel rank (tp=2) resumed on 1 rank: the data-parallel size is the same, so the
    saved data-parallel rank's own file (found through trainer.json's data layout) continues batch for batch."""
    ref = tmp_path / "tp"
    train(ref, 2, "parallel=tp")
    layout = json.loads((ref / "checkpoints" / "step_000000004" / "trainer.json").read_text())["data_layout"]
    assert layout == {"n_readers": 1, "dp_world_size": 1, "num_workers": 1, "files": [0]}
    one = resumed_copy(ref, tmp_path / "tp_then_one")
    train(one, 1)
    a, b = metrics(ref), metrics(one)
    assert [b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-4) for s in b] == [True] * 4
    assert readers_at_8(ref) == readers_at_8(one)


def test_growing_past_the_readers_is_refused_then_allowed(tmp_path):
    ref = tmp_path / "one"
    train(ref, 1)  # one reader: data.readers defaults to ranks x workers = 1
    grown = resumed_copy(ref, tmp_path / "grown")
    err = train(grown, 2, expect=1)
    assert "training data has 1 readers (data.readers, fixed when the run started) but this run has 2" in err, err
    assert "checkpoint.allow_data_change=true" in err
    log = train(grown, 2, "checkpoint.allow_data_change=true")
    assert "the data loaders start afresh" in log and metrics(grown)[8]["tokens"] == 8 * 256
