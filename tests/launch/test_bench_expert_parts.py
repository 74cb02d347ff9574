"""launch/bench_expert_parts.py: the row bookkeeping, the check that the overlap's three parts equal one part (and
that it fails when they do not), and a real CPU run of the benchmark."""

import json

import pytest
import torch

from launch import bench_expert_parts as bep

TINY = ["--device", "cpu", "--rows", "256", "--hidden", "32", "--intermediate", "64", "--iters", "1", "--warmup", "1"]


def test_split_counts_cuts_the_rows_where_the_overlap_does():  # parallel.ep_overlap.split_counts, which both use
    first, rest = bep.split_counts(torch.tensor([3, 2, 4]), 4)  # rows 0-2 expert 0, 3-4 expert 1, 5-8 expert 2
    assert first.tolist() == [3, 1, 0] and rest.tolist() == [0, 1, 4]


def test_grouped_order_puts_each_experts_own_rows_before_the_others():
    # own rows: 0,1 (expert 0), 2 (expert 1); the others' rows: 3 (expert 0), 4,5 (expert 1)
    assert bep.grouped_order(torch.tensor([2, 1]), torch.tensor([1, 2])).tolist() == [0, 1, 3, 2, 4, 5]


def test_the_benchmark_checks_and_times_both_variants(tmp_path):
    out = tmp_path / "r.json"
    r = bep.main(TINY + ["--json", str(out)])
    assert json.loads(out.read_text())["ms_per_layer"] == r["ms_per_layer"]
    assert r["ms_per_layer"]["one"] > 0 and r["ms_per_layer"]["parts"] > 0
    assert max(r["check_rel_err"].values()) < 1e-5 and set(r["check_rel_err"]) == {
        "y", "x.grad", "gate_proj.grad", "up_proj.grad", "down_proj.grad"}


def test_the_check_fails_when_the_parts_compute_something_else(monkeypatch):
    real = bep.split_counts
    monkeypatch.setattr(bep, "split_counts", lambda c, a: (real(c, a)[0].roll(1), real(c, a)[1]))  # wrong experts
    with pytest.raises(AssertionError, match="the three parts differ from one part"):
        bep.main(TINY)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bep.main(TINY + ["--own-share", "1.0"])
