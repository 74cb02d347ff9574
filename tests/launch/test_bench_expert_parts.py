"""launch/bench_expert_parts.py: the row bookkeeping, the check that the overlap's three parts equal one part (and
that it fails when they do not), and a real CPU run of the benchmark."""

import json

import pytest
import torch

from jamba.moe import GroupedExperts
from launch import bench_expert_parts as bep

TINY = ["--device", "cpu", "--rows", "256", "--hidden", "32", "--intermediate", "64", "--iters", "1", "--warmup", "1"]


def test_split_counts_cuts_the_rows_where_the_overlap_does():  # parallel.ep_overlap.split_counts, which both use
    first, rest = bep.split_counts(torch.tensor([3, 2, 4]), 4)  # rows 0-2 expert 0, 3-4 expert 1, 5-8 expert 2
    assert first.tolist() == [3, 1, 0] and rest.tolist() == [0, 1, 4]


def test_grouped_order_puts_each_experts_own_rows_before_the_others():
    # own rows: 0,1 (expert 0), 2 (expert 1); the others' rows: 3 (expert 0), 4,5 (expert 1)
    assert bep.grouped_order(torch.tensor([2, 1]), torch.tensor([1, 2])).tolist() == [0, 1, 3, 2, 4, 5]


def test_the_benchmark_checks_and_times_the_variants(tmp_path):
    out = tmp_path / "r.json"
    r = bep.main(TINY + ["--json", str(out)])
    assert json.loads(out.read_text())["ms_per_layer"] == r["ms_per_layer"]
    assert set(r["ms_per_layer"]) == {"one", "autograd", "split", "split_one"}
    assert all(v > 0 for v in r["ms_per_layer"].values())
    assert set(r["forward_ms_per_layer"]) == {"one", "split"}
    assert set(r["breakdown_ms"]["split_one"]) == {"forward", "input grad", "weight grad"}
    assert len(r["breakdown_ms"]["split"]) == 9 and all(v >= 0 for v in r["breakdown_ms"]["split"].values())
    for variant in ("autograd", "split", "split_one"):
        errs = r["check_rel_err"][variant]
        assert set(errs) == {"y", "x.grad", "gate_proj.grad", "up_proj.grad", "down_proj.grad"}
        assert max(errs.values()) < 1e-5


@pytest.mark.parametrize("variant", ["autograd", "split"])
def test_the_check_fails_when_the_parts_compute_something_else(monkeypatch, variant):
    real = bep.split_counts
    monkeypatch.setattr(bep, "split_counts", lambda c, a: (real(c, a)[0].roll(1), real(c, a)[1]))  # wrong experts
    with pytest.raises(AssertionError, match=f"run_{variant} differs from one part"):
        torch.manual_seed(0)
        mod = GroupedExperts(4, 32, 64)
        with torch.no_grad():
            for w in mod.parameters():
                w.normal_(0, 0.02)
        perm, one, parts = bep.prepare(bep.make_case(256, 4, 0.5, 32, torch.float32, torch.device("cpu")))
        bep.check(mod, perm, one, getattr(bep, f"run_{variant}"), parts, 1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bep.main(TINY + ["--own-share", "1.0"])
