"""Context parallelism reproduces the single-process run (tiny model with Mamba-1, attention and MoE
layers, float64, gloo on CPU): the loss of 3 AdamW steps, every gradient after the first backward and every
parameter after the 3 steps, for cp alone and composed with TP, FSDP and EP, with document masking and a
sequence length (96) that is not a power of two (24 tokens per rank at cp=4).

Mamba-2 mixers (m2=G: G B/C groups) are split by heads: one group read by every rank (cp=2, G=1; compiled),
one group per rank (cp=2, G=2), a group shared by two ranks (cp=4, G=2) and two groups per rank (cp=2 x
dp_shard=2 x ep=2, G=4).
Layouts cover every attention path: Ulysses with kv heads sharded (cp=2, kv 2), repeated (cp=4 and kv=1;
cp=2 x tp=2, one kv head per TP rank) and the all-gather-KV fallback (cp=4 with 2 query heads and one or two
kv heads, cp=2 with one query head; RoPE; causal through a lower-right bias, and with document masking
through an explicit mask, so global positions and whole-row document ids are exercised; ranks c and cp-1-c
swap half their queries for the causal load balance). Also: HSDP (FSDP over dp_shard x cp inside each
replica) and torch.compile of the layers (aot_eager) over the cp collectives.

Tolerance 1e-10 relative (difference norm / reference norm): in float64 the layouts differ from one process
only in summation order (all-reduces, sharded matmuls), ~1e-16 per operation; measured up to 3e-14 on the
parameters after 3 AdamW steps (norms, RoPE and the losses accumulate in float64 for a float64 model, and
FSDP on CPU keeps the parameters' dtype).
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cp_worker  # noqa: E402
import torchrun_worker  # noqa: E402
from torchrun_worker import check_matches, run_worker  # noqa: E402

LAYOUTS_2 = ["cp=2+doc=1+compile=aot_eager", "cp=2+kv=1", "cp=2+heads=1+kv=1+rope=1+compile=aot_eager",
             "cp=2+m2=1+compile=aot_eager", "cp=2+m2=2"]
BROKEN = "cp=2+broken=1"  # run with the 2-process layouts, checked to fail
LAYOUTS_4 = ["cp=4", "cp=2+tp=2+doc=1", "cp=2+dp_shard=2+ep=2+doc=1", "cp=4+heads=2+rope=1+doc=1",
             "cp=4+heads=2+kv=1+rope=1", "dp_replicate=2+dp_shard=1+cp=2+doc=1", "cp=4+m2=2",
             "cp=2+dp_shard=2+ep=2+m2=4+doc=1"]
TOL = 1e-10
FLOOR = 1e-300  # norm floor of the relative differences

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    results = run_worker("cp_worker.py", 2, tmp / "w2.pt", "layouts=" + ",".join(LAYOUTS_2 + [BROKEN]),
                         "dtype=float64", timeout=560)
    results.update(run_worker("cp_worker.py", 4, tmp / "w4.pt", "layouts=" + ",".join(LAYOUTS_4), "dtype=float64",
                              timeout=560))
    torch.set_num_threads(1)
    refs = {spec: cp_worker.reference(spec, torch.float64) for spec in LAYOUTS_2 + LAYOUTS_4 + [BROKEN]}
    return results, refs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return torchrun_worker.rel(a, b, FLOOR)


@pytest.mark.parametrize("spec", LAYOUTS_2 + LAYOUTS_4)
def test_context_parallel_matches_single_process(runs, spec):
    results, refs = runs
    check_matches(spec, results[spec], refs[spec], TOL, FLOOR)


@pytest.mark.parametrize("spec", LAYOUTS_2 + LAYOUTS_4)
def test_sequence_is_really_split(runs, spec):
    """Guard that the comparison can fail: the layers ran on L / cp tokens, and the cp ranks' language-model
    losses (each over its own chunk) differ, while their mean is the single-process loss."""
    results, refs = runs
    got = results[spec]
    kw, _, seq = cp_worker.parse(spec)
    assert got["layer_seq_len"] == seq // kw["cp"]
    losses = got["rank_lm_losses"]
    assert max(losses) - min(losses) > 1e-3, losses


def test_a_wrong_adjoint_is_caught(runs):
    """Guard that the gradient comparison can fail where the loss cannot: with x_proj's sum over cp losing the
    sum in its backward, the losses of the first step still match one process, the gradients do not."""
    results, refs = runs
    got, ref = results[BROKEN], refs[BROKEN]
    assert abs(got["losses"][0] - ref["losses"][0]) <= TOL * abs(ref["losses"][0])
    worst = max(rel(got["grads"][n], g) for n, g in ref["grads"].items())
    assert worst > 1e-3, worst
