"""launch/bench_ep_layer.py: a real CPU run (in a subprocess: it initialises torch's fake process group, which
would outlive the test in this process), its refusal of bad arguments, and the counts' pass-through."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--preset", "tiny", "--seq", "32", "--batch", "2", "--iters", "1", "--warmup", "1"]


def _run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "launch.bench_ep_layer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


def test_every_variant_runs_on_the_fake_group(tmp_path):
    out = tmp_path / "r.json"
    r = _run(TINY + ["--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["ms_per_layer"]) == {"plain", "sized", "overlap", "padded"}
    assert all(v > 0 for v in res["ms_per_layer"].values())
    assert set(res["above_plain_ms_per_step"]) == {"sized", "overlap", "padded"} and res["moe_layers"] == 2


@pytest.mark.parametrize("bad,message", [(["--variants", "sized,fixed"], "unknown ['fixed']"),
                                         (["--ep", "1"], "at least 2 ranks"),
                                         (["--profile"], "--profile needs --device cuda")])
def test_bad_arguments_are_refused(tmp_path, bad, message):
    r = _run(TINY + bad, tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_counts_come_back_as_sent_and_rows_are_left_alone(monkeypatch):
    """As the fake backend on CUDA, which leaves outputs as they were: the shim hands integer tensors (the
    counts) back as sent and leaves the rows alone."""
    import torch
    import torch.distributed as dist

    from launch import bench_ep_layer as b

    monkeypatch.setattr(dist, "all_to_all_single", lambda output, input, *a, **k: None)  # moves nothing
    b._counts_pass_through()
    sent, got = torch.arange(1, 9), torch.zeros(8, dtype=torch.long)
    rows, recv = torch.ones(4, 2), torch.zeros(4, 2)
    dist.all_to_all_single(got, sent)
    dist.all_to_all_single(recv, rows)
    assert got.tolist() == sent.tolist() and recv.abs().sum() == 0
