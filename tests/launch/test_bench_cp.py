"""launch/bench_cp.py on CPU (gloo, 2 processes, tiny model): it trains, reports throughput and memory per
rank, and its profile attributes time to the context-parallel all-to-alls (the hook the GPU run reads)."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests.envs import pythonpath
from tests.process_tree import run_tree

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


MAMBA2 = ["--set", "mamba_mixer=mamba2", "--set", "mamba2_head_dim=16", "--set", "mamba2_chunk_size=32"]


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2-g1", "mamba2-g2"])
def test_bench_cp_cpu_smoke(tmp_path, mixer):
    """Mamba-2 with one B/C group all-gathers B and C (the ranks share the group); with two groups at cp=2
    each rank's heads read their own group, which travels in the heads' all-to-all (no all-gather)."""
    out = tmp_path / "cp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch" / "bench_cp.py"), "--device", "cpu", "--preset", "tiny", "--cp", "2", "--seq", "96",
           "--steps", "2", "--warmup", "1", "--profile", "--json", str(out)]
    if mixer != "mamba1":
        cmd += MAMBA2 + ["--set", f"mamba2_n_groups={mixer[-1]}"]
    r = run_tree(cmd, cwd=tmp_path, env=env, timeout=280)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["cp"] == 2 and "cp=2" in res["dims"] and len(res["step_ms"]) == 2
    assert res["weights"] == "fp32-master" and res["states_sharded_over"] == 2  # what launch.plan is told
    assert res["tokens_per_s"] == pytest.approx(96 / (res["step_ms_median"] / 1e3))
    assert len(res["peak_alloc_gib_per_rank"]) == 2 and len(res["losses"]) == 3
    assert res["losses"][-1] < res["losses"][0]  # it trains (same batch every step)
    # the bytes sent through cp's collectives per step are what the traffic model predicts (fp32 on CPU)
    used = {"mamba1": ("all_to_all", "all_reduce"), "mamba2-g1": ("all_to_all", "all_reduce", "all_gather"),
            "mamba2-g2": ("all_to_all",)}[mixer]  # Mamba-1: x_proj's sums; Mamba-2 G=1: B/C gathered, summed back
    for kind in ("all_to_all", "all_reduce", "all_gather"):
        assert res["cp_bytes_sent_per_step"][kind] == pytest.approx(res["cp_bytes_predicted"][kind], rel=1e-6)
        assert (res["cp_bytes_predicted"][kind] > 0) == (kind in used), (kind, res["cp_bytes_predicted"])
    prof = res["profile"]
    assert prof["nccl_ms"]["all_to_all (cp)"] > 0 and 0 < prof["nccl_share"] < 1
