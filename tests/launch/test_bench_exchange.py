"""launch/bench_exchange.py: what each rank should receive, and the NCCL-side transports (all_to_all_single and
batched send/recv) on 2 and 3 gloo ranks, whose rows the script checks before timing them."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.process_tree import run_tree

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rows,ep", [(10, 2), (11, 3), (2, 3)])
def test_expected_rows_are_each_sources_share_in_rank_order(rows, ep):
    from launch.bench_exchange import expected_rows, make_rows, splits_for

    sp = splits_for(rows, ep)
    assert sum(sp) == rows and max(sp) - min(sp) <= 1
    sent = [make_rows(rows, 3, torch.float32, torch.device("cpu"), s) for s in range(ep)]
    for r in range(ep):  # rank r gets, from each source s in order, the rows s addresses to r
        want = torch.cat([x[sum(sp[:r]):sum(sp[:r + 1])] for x in sent])
        got = expected_rows(rows, 3, torch.float32, torch.device("cpu"), r, ep)
        assert torch.equal(got, want)
        assert got[:, 2].tolist() == [float(s + 1) for s in range(ep) for _ in range(sp[r])]  # tagged by source


def test_every_row_is_told_apart_in_bf16():
    from launch.bench_exchange import make_rows

    x = make_rows(40000, 3, torch.bfloat16, torch.device("cpu"), 1).float()
    ids = (x[:, 0] + 256 * x[:, 1]).long()
    assert torch.equal(ids, torch.arange(40000))  # no two rows alike: a reordering would be caught


def test_the_check_stops_every_rank_on_wrong_rows(tmp_path):
    import torch.distributed as dist

    from launch.bench_exchange import WrongRows, check

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        want = torch.ones(4, 3)
        check("nccl", "first", want.clone(), want, dist.group.WORLD)  # right rows: no error
        with pytest.raises(WrongRows, match=r"nccl: rank\(s\) \[0\] received wrong rows \(first exchange\)"):
            check("nccl", "first", want.flip(0) * 2, want, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("nproc,rows", [(2, 64), (3, 65)])
def test_cpu_transports_deliver_the_right_rows(tmp_path, nproc, rows):
    out = tmp_path / "bx.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = run_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "launch.bench_exchange", "--device", "cpu",
                        "--rows", str(rows), "--hidden", "16", "--warmup", "1", "--iters", "2", "--json", str(out),
                        "--label", "test"], cwd=ROOT, env=env, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["transport"] for x in res] == ["nccl", "nccl_p2p"]  # symmetric memory needs CUDA: left out
    for x in res:
        assert "error" not in x and x["ms"] > 0 and x["ep"] == nproc and x["label"] == "test"
        # rank 0 sends all its rows but its own share: rows - ceil(rows / ep) of 16 bf16 values
        assert x["remote_bytes"] == (rows - -(-rows // nproc)) * 16 * 2
