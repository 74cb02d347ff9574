"""parallel.ep_exchange=overlap (parallel/ep_overlap.py): the same result as the plain "sized" exchange, with every
all-to-all started before an expert GEMM and waited for after it (gloo, float64, 2 and 3 ranks).

The whole-model equivalence with one process is in test_parallel_layouts.py (layouts with +ep_exchange=overlap);
this test pins what makes it an overlap, which equal numbers alone would not show: an implementation that waited
for each exchange at once (or let autograd order the backward) would pass those and fail here.
"""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from torchrun_worker import run_worker  # noqa: E402

CASES = "odd,none_for_me,isolated,starved"
# part 0 = the first half of my own rows, 1 = the rows from the other ranks, 2 = the second half of my own rows
FORWARD = ["sync", "start", "fwd0", "wait", "fwd1", "start", "fwd2", "wait"]
BACKWARD = ["start", "bwd2", "wait", "bwd1", "start", "bwd0", "wait"]
TOL = 1e-12  # float64; the weight gradients are summed in three parts instead of one

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=[2, 3], ids=["ep=2", "ep=3"])
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_overlap") / "r.pt"
    return run_worker("ep_overlap_worker.py", request.param, out, f"cases={CASES}", timeout=150)


@pytest.mark.parametrize("case", CASES.split(","))
def test_overlap_matches_the_sized_exchange(runs, case):
    for rank, r in enumerate(runs[case]):
        for name, err in r["err"].items():
            assert err <= TOL, f"{case}, rank {rank}: {name} differs from the sized exchange by {err:.2e}"


def test_every_exchange_runs_under_a_gemm(runs):
    """Forward: the dispatch travels during part 0, the combine during part 2; backward: the outputs' gradients
    during part 2's backward, the inputs' gradients during part 0's. Only the split-size exchange is synchronous."""
    for rank, r in enumerate(runs["odd"]):
        assert r["events"] == FORWARD + ["|"] + BACKWARD, f"rank {rank}: {r['events']}"


@pytest.mark.parametrize("case", ["none_for_me", "isolated"])
def test_empty_parts_are_skipped_and_every_exchange_still_runs(runs, case):
    """A part with no rows is not computed (no empty GEMM, no host sync for it), but every rank still takes part in
    all four all-to-alls, or the ranks that do have rows would wait forever."""
    for rank, r in enumerate(runs[case]):
        ev = r["events"]
        assert ev.count("start") == 4 and ev.count("wait") == 4 and ev.count("sync") == 1, f"rank {rank}: {ev}"
        fwd, bwd = ev[:ev.index("|")], ev[ev.index("|") + 1:]
        assert sorted(e for e in fwd if e.startswith("fwd")) == sorted(
            e.replace("bwd", "fwd") for e in bwd if e.startswith("bwd")), f"rank {rank}: {ev}"
    # the case does empty a part (rank 0 keeps no rows for its experts / rank 1 receives none)
    assert any(sum(e.startswith("fwd") for e in r["events"]) < 3 for r in runs[case])
