"""parallel.ep_exchange=overlap (parallel/ep_overlap.py): the same result as the plain "sized" exchange, with every
all-to-all started before an expert GEMM and waited for after it (gloo, 2 and 3 ranks; float64, and fp32 under
bf16 autocast).

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

# odd: an odd number of own rows (uneven halves); one_own: rank 0's first half is empty; none_for_me: rank 0 keeps
# no row; isolated: rank 1 neither sends nor receives; starved: rank 1's experts get no row at all
CASES = "odd,one_own,none_for_me,isolated,starved"
# on the odd routing: down_proj frozen; every expert weight frozen (no weight gradient is computed); rows that need
# no gradient (only the experts train); loss y.sum() (an expanded output gradient)
GRAD_CASES = "frozen_down,frozen,x_no_grad,sum_loss"
# part 0 = the first half of my own rows, 1 = the rows from the other ranks, 2 = the second half of my own rows
# "/sm4": run under the SM carveout (the parts beside an all-to-all leave it 4 SMs; the worker passes sms=4)
FORWARD = ["sync", "start", "fwd0/sm4", "wait", "fwd1", "start", "fwd2/sm4", "wait"]
# the weight gradients run last, beside the input gradients' return: my rows' at once, then the received rows'
BACKWARD = ["start", "bwd2/sm4", "wait", "bwd1", "start", "bwd0/sm4", "wgrad/sm4", "wgrad/sm4", "wait"]
TOL = 1e-12  # float64; the weight gradients are summed in two parts instead of one
TOL_BF16 = 2e-2  # autocast: bf16 GEMMs over other row groupings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=[2, 3], ids=["ep=2", "ep=3"])
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_overlap") / "r.pt"
    return run_worker("ep_overlap_worker.py", request.param, out, f"cases={CASES},{GRAD_CASES}", timeout=150)


@pytest.fixture(scope="module")
def autocast_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_overlap_autocast") / "r.pt"
    return run_worker("ep_overlap_worker.py", 2, out, f"cases={CASES}", "autocast=1", timeout=150)


@pytest.mark.parametrize("case", CASES.split(",") + GRAD_CASES.split(","))
def test_overlap_matches_the_sized_exchange(runs, case):
    """Equal outputs and gradients, and the same gradients missing: x's when it needs none, frozen weights'."""
    expected_none = {"frozen_down": ["down_proj"], "frozen": ["gate_proj", "up_proj", "down_proj"],
                     "x_no_grad": ["x.grad"]}.get(case, [])
    for rank, r in enumerate(runs[case]):
        assert r["none"] == expected_none, (case, rank, r["none"])
        for name, err in r["err"].items():
            assert err <= TOL, f"{case}, rank {rank}: {name} differs from the sized exchange by {err:.2e}"


@pytest.mark.parametrize("case", CASES.split(",") + GRAD_CASES.split(","))
def test_every_exchange_runs_under_a_gemm(runs, case):
    """Forward: the dispatch travels during part 0 (started before its GEMMs, after the copy of my rows, which
    gives the GPU work as soon as the host sync is over), the combine during part 2; backward: the outputs' gradients
    during part 2's input gradient, the inputs' gradients during part 0's and the weight gradients. Only the
    split-size exchange is synchronous. Exactly the computations beside an all-to-all (parts 0 and 2, forward and
    backward, and the weight gradients) run under the SM carveout, which is restored after each (no carveout after
    the forward and after the backward).
    Every rank runs every part, even one with no rows, so every rank issues the same exchanges in the same order
    (and a rank whose experts get nothing still gives their weights gradients, the worker checks). With every
    expert weight frozen no weight gradient is computed."""
    backward = [e for e in BACKWARD if not e.startswith("wgrad")] if case == "frozen" else BACKWARD
    for rank, r in enumerate(runs[case]):
        assert r["events"] == FORWARD + ["|"] + backward + ["end"], f"{case}, rank {rank}: {r['events']}"


@pytest.mark.parametrize("case", CASES.split(","))
def test_autocast_gives_every_rank_the_sized_exchanges_dtypes(autocast_runs, case):
    """fp32 rows, bf16 experts: the outputs (hence the exchanged buffers) are bf16 on every rank, also on a rank
    with an empty part, whose dtype once came from the rows instead (fp32), so the ranks exchanged buffers of
    different sizes; the gradients come back in the rows' dtype."""
    for rank, r in enumerate(autocast_runs[case]):
        for name, (got, ref) in r["dtypes"].items():
            assert got == ref, f"{case}, rank {rank}: {name} is {got}, the sized exchange gives {ref}"
        assert r["dtypes"]["y"][0] == "torch.bfloat16" and r["dtypes"]["x.grad"][0] == "torch.float32"
        for name, err in r["err"].items():
            assert err <= TOL_BF16, f"{case}, rank {rank}: {name} differs from the sized exchange by {err:.2e}"
