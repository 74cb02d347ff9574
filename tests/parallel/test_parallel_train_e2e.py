"""End to end through train.py, comparing layouts that read the same batches (same data-parallel size):
`torchrun --nproc_per_node 4 train.py parallel=tp_ep` (tp=2, dp_shard=2, ep=2) logs the same losses and
gradient norms as `torchrun --nproc_per_node 2 train.py parallel=fsdp`, and tp=2 with sequence parallelism
and activation checkpointing on 2 processes the same as one process. A layout that cannot work fails before
any process group is created, with the fix in the message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process_tree import run_tree

ROOT = Path(__file__).resolve().parent.parent.parent
pytest.importorskip("hydra")  # train.py's dependency (absent on some bare GPU images)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _train(nproc: int, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "train.py",
           "experiment=debug", "train.max_steps=3", "train.eval_every=0", "checkpoint.every=0",
           f"hydra.run.dir={run_dir}", *overrides]
    return run_tree(cmd, cwd=ROOT, env=env, timeout=300)


def _records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("a,b", [
    ((4, "parallel=tp_ep"), (2, "parallel=fsdp")),
    ((2, "parallel=tp", "parallel.sequence_parallel=true", "model.activation_checkpointing=[all]"),
     (1, "parallel=single")),
    # auxiliary-loss-free balancing: EP (experts split over the ranks, tokens exchanged) routes with the biases
    # exactly as FSDP (every expert on each rank). That every rank holds the same biases (global counts) is
    # checked by the ep_balanced kill/resume scenario (tests/gpu/test_train_multi_gpu.py), where diverging
    # biases make the resumed run differ: per-rank counts fail it at step 5
    ((2, "parallel=ep", "model.moe_router_bias_update_rate=0.05"),
     (2, "parallel=fsdp", "model.moe_router_bias_update_rate=0.05")),
], ids=["tp_ep-vs-fsdp", "tp_sp_ac-vs-single", "ep-vs-fsdp-expert-bias"])
def test_layouts_match_through_train_py(tmp_path, a, b):
    pa = _train(a[0], tmp_path / "a", *a[1:])
    assert pa.returncode == 0, pa.stderr[-5000:]
    pb = _train(b[0], tmp_path / "b", *b[1:])
    assert pb.returncode == 0, pb.stderr[-5000:]
    ra = [r for r in _records(tmp_path / "a") if "loss" in r]
    rb = [r for r in _records(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in ra] == [1, 2, 3] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x, y)


def test_invalid_layout_fails_before_startup(tmp_path):
    r = _train(2, tmp_path / "bad", "parallel=ep", "parallel.ep=3")
    assert r.returncode != 0
    assert "parallel.ep=3 must divide dp_shard(2)" in r.stderr + r.stdout
    assert "process group: gloo" not in r.stderr + r.stdout  # nothing was started


MAMBA2 = ("model.mamba_mixer=mamba2", "model.mamba2_head_dim=16", "model.mamba2_chunk_size=32")


@pytest.mark.parametrize("mixer", [(), MAMBA2], ids=["mamba1", "mamba2"])
def test_context_parallel_matches_one_process_through_train_py(tmp_path, mixer):
    """`torchrun --nproc_per_node 2 train.py experiment=debug parallel.cp=2` (each rank half of every 64-token
    row, activation checkpointing so the layers' collectives run again in the recompute) logs the losses,
    gradient norms and validation loss of one process on the same batches (fp32: 1e-5); with Mamba-1 and with
    Mamba-2 mixers (8 heads of 16 channels, one B/C group)."""
    common = ("train.eval_every=3", "model.activation_checkpointing=[all]", *mixer)
    pa = _train(2, tmp_path / "a", "parallel.cp=2", *common)
    assert pa.returncode == 0, pa.stderr[-5000:]
    assert "context parallelism cp=2" in pa.stderr + pa.stdout
    assert ("mamba2 x3" in pa.stderr + pa.stdout) == bool(mixer)  # the Mamba-2 layers were split, by heads
    pb = _train(1, tmp_path / "b", "parallel=single", *common)
    assert pb.returncode == 0, pb.stderr[-5000:]
    ra, rb = _records(tmp_path / "a"), _records(tmp_path / "b")
    la, lb = [r for r in ra if "loss" in r], [r for r in rb if "loss" in r]
    assert [r["step"] for r in la] == [1, 2, 3] == [r["step"] for r in lb]
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x, y)
    va, vb = [r["val_loss"] for r in ra if "val_loss" in r], [r["val_loss"] for r in rb if "val_loss" in r]
    assert len(va) == 1 and va == pytest.approx(vb, rel=1e-5)


def test_context_parallel_checks_every_stage_before_startup(tmp_path):
    r = _train(2, tmp_path / "bad", "parallel.cp=2", "curriculum.stages.0.seq_len=63")
    assert r.returncode != 0
    assert "sequence length 63 must be divisible by parallel.cp=2" in r.stderr + r.stdout
    assert "process group: gloo" not in r.stderr + r.stdout  # nothing was started


@pytest.mark.parametrize("nproc,layout", [(2, "parallel.cp=2"), (1, "parallel=single")], ids=["cp2", "single"])
def test_resume_across_a_stage_switch(tmp_path, nproc, layout):
    """A curriculum 32 -> 64 tokens (switch at step 2): stopping after step 2 (a checkpoint whose loader is still
    in the first stage) and running on to step 4 gives exactly the losses of the uninterrupted run (constant
    LR, so the shorter first run has the same schedule). Before the fix the resumed run restarted the data."""
    common = (layout, "optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.every=0",
              "curriculum.stages=[{seq_len:32,micro_batch_size:4,steps:2},{seq_len:64,micro_batch_size:2}]")
    whole = _train(nproc, tmp_path / "whole", *common, "train.max_steps=4")
    assert whole.returncode == 0, whole.stderr[-5000:]
    first = _train(nproc, tmp_path / "split", *common, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-5000:]
    second = _train(nproc, tmp_path / "split", *common, "train.max_steps=4")
    assert second.returncode == 0, second.stderr[-5000:]
    # the checkpoint's stage (that of step 2) and the config agree: no warning (the 2-GPU run warned spuriously)
    assert "checkpoint says curriculum stage" not in second.stderr + second.stdout
    assert "resuming from" in second.stderr + second.stdout
    la = {r["step"]: (r["loss"], r["seq_len"]) for r in _records(tmp_path / "whole") if "loss" in r}
    lb = {r["step"]: (r["loss"], r["seq_len"]) for r in _records(tmp_path / "split") if "loss" in r}
    assert sorted(la) == [1, 2, 3, 4] and [la[s][1] for s in (1, 2, 3, 4)] == [32, 32, 64, 64]
    assert lb == la
