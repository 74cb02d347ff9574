"""The gradient norm's collectives do not depend on which gradients a rank has (trainer.loop.clip_grad_norm).

A sharded parameter without a gradient on one rank (an expert-parallel rank whose experts got no tokens, before
parallel/ep_overlap.py ran them on nothing) made that rank skip the all-reduce of its mesh's norm while the other
ranks ran it: on 2 H200s the step hung. Now a missing gradient of a sharded parameter counts as zeros, every rank
runs the same all-reduces and gets the same norm.
"""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from torchrun_worker import run_worker  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_a_gradient_missing_on_one_rank_gives_every_rank_the_same_norm(tmp_path):
    res = run_worker("grad_norm_worker.py", 2, tmp_path / "r.pt", timeout=100)
    assert res["norms"][0] == res["norms"][1]
    assert res["norms"][0] == pytest.approx(res["expected"], rel=1e-6)  # the norm is summed in fp32
