"""launch/scale.py and launch/comm_profile.py: the arithmetic on fake records, and one real CPU run (gloo, tiny)."""

import json
import math
import sys
from pathlib import Path

import pytest

from launch import comm_profile, scale
from tests.process_tree import run_tree

REPO = Path(__file__).resolve().parents[2]


def _records(rates, log_every=2, tokens_per_step=100):
    """Training records every `log_every` steps, each window at the given tokens/s, plus a validation record."""
    recs = []
    for i, rate in enumerate(rates, 1):
        step = i * log_every
        recs.append({"step": step, "tokens": step * tokens_per_step, "loss": 10.0 - i, "tokens_per_s": rate,
                     "mem_gb": float(i)})
    recs.append({"step": step, "tokens": step * tokens_per_step, "val_loss": 5.0})
    return recs


def test_median_window_weighs_windows_by_tokens():
    assert scale.weighted_median([(100.0, 1), (400.0, 1)]) == 250.0  # equal weights: statistics.median
    assert scale.weighted_median([(3.0, 1), (1.0, 1), (2.0, 1)]) == 2.0
    assert scale.weighted_median([(100.0, 3), (400.0, 1)]) == 100.0
    # after the warm-up, full windows of 200 tokens at 100, 200 and 300 tokens/s, then a short last one (1 step,
    # 100 tokens) at 50: unweighted, the median was (100 + 200) / 2 = 150; by tokens it is 200
    recs = [r for r in _records([1.0, 100.0, 200.0, 300.0]) if "loss" in r]
    recs.append({"step": 9, "tokens": 900, "loss": 5.5, "tokens_per_s": 50.0, "mem_gb": 0.0})
    assert scale.timed_throughput(recs, warmup=2)["median_window_tokens_per_s"] == 200.0
    assert scale.timed_throughput(recs[:3], warmup=2)["median_window_tokens_per_s"] == 150.0  # equal halves


def test_timed_throughput_is_tokens_over_time_after_warmup():
    # windows of 200 tokens: steps 1-2 at 1 tokens/s (warm-up, left out), 3-4 at 100, 5-6 at 400
    tp = scale.timed_throughput(_records([1.0, 100.0, 400.0]), warmup=2)
    assert tp["timed_steps"] == 4
    assert tp["tokens_per_s"] == pytest.approx(400 / (200 / 100 + 200 / 400))  # not the mean of the rates (250)
    assert tp["step_ms"] == pytest.approx(1e3 * (2.0 + 0.5) / 4)
    assert tp["median_window_tokens_per_s"] == 250.0  # of the timed windows' rates (100, 400)
    stalled = scale.timed_throughput(_records([1.0, 100.0, 100.0, 50.0, 100.0]), warmup=2)
    assert stalled["median_window_tokens_per_s"] == 100.0 and stalled["tokens_per_s"] < 90.0  # one slow window
    assert tp["peak_gib"] == 3.0 and tp["loss_last"] == 7.0
    assert scale.timed_throughput(_records([1.0, 100.0]), warmup=0)["timed_steps"] == 4
    assert tp["moe_rank_load_max"] is None  # no EP records
    recs = _records([1.0, 100.0, 400.0])
    for r, load in zip(recs, (2.0, 1.3, 1.1)):  # the warm-up record's 2.0 is not a timed one
        r["moe_rank_load_max"] = load
    assert scale.timed_throughput(recs, warmup=2)["moe_rank_load_max"] == 1.3
    with pytest.raises(ValueError, match="no training record after the 6 warm-up steps"):
        scale.timed_throughput(_records([1.0, 100.0, 400.0]), warmup=6)


def test_fill_efficiency_and_mfu():
    single = scale.Result("single", 1)
    scale.fill(single, {"tokens_per_s": 100.0, "median_window_tokens_per_s": 100.0, "timed_steps": 8, "step_ms": 10.0, "peak_gib": 1.0, "loss_last": 3.0},
               scale.layout("single", 2), flops_per_token=1e12, ceiling=500.0)
    res = scale.Result("fsdp", 2)
    tp = {"tokens_per_s": 180.0, "median_window_tokens_per_s": 170.0, "timed_steps": 8, "step_ms": 10.0, "peak_gib": 1.0, "loss_last": 3.0}
    scale.fill(res, tp, scale.layout("fsdp", 2), flops_per_token=1e12, ceiling=500.0)
    res = scale.aggregate([single, res])[1]  # the efficiency against the single-GPU run
    assert res.tokens_per_s_per_gpu == 90.0 and res.efficiency == pytest.approx(0.9)
    assert res.mfu == pytest.approx(1e12 * 90 / 500e12)
    table = scale.markdown([res, scale.Result("tp", 2, status="exit 1")],
                           {"preset": "tiny", "seq": 64, "micro_batch": 2, "compile": False, "timed": 8,
                            "warmup": 4, "dtype": "bf16", "ceiling_tflops": 500.0, "device": "cpu"})
    assert "| fsdp | 2 | 180 | 90 | 85 | 90.0% | 18.0% | 10 | 1.0 | - | - |" in table
    assert "| tp **exit 1** | 2 | - |" in table
    res.comm = {"nccl_ms_by_kind": {"SendRecv": 19.0}, "nccl_share_of_wall": 0.05, "nccl_exposed_share_of_wall": 0.04,
                "sendrecv_ms_per_step": {"count": 40.0, "counts_by_rank": [120, 120], "exchange": 8.25,
                                         "wait_by_rank": [9.5, 1.25]}}
    table = scale.markdown([res], {"preset": "tiny", "seq": 64, "micro_batch": 2, "compile": False, "timed": 8,
                                   "warmup": 4, "dtype": "bf16", "ceiling_tflops": 500.0, "device": "cpu"})
    assert ("5.0% (SendRecv 19.0 ms); not hidden 4.0%; all-to-alls 8.2 ms moving rows, waits by rank 9.5/1.2 ms"
            in table), table
    res.comm["sendrecv_ms_per_step"]["counts_by_rank"] = [120, 119]  # a rank ran one more: no pairing
    table = scale.markdown([res], {"preset": "tiny", "seq": 64, "micro_batch": 2, "compile": False, "timed": 8,
                                   "warmup": 4, "dtype": "bf16", "ceiling_tflops": 500.0, "device": "cpu"})
    assert "not hidden 4.0%; all-to-alls: ranks ran different numbers, not split |" in table, table


def test_repeated_runs_give_the_median_the_spread_and_the_ratio_to_fsdp():
    lay = {n: scale.layout(n, 2) for n in ("single", "fsdp", "ep")}

    def run(name, rate, status="ok"):
        res = scale.Result(name, lay[name].gpus, status="not run")
        if status == "ok":
            tp = {"tokens_per_s": rate * lay[name].gpus, "median_window_tokens_per_s": (rate + 1) * lay[name].gpus,
                  "timed_steps": 8, "step_ms": 1e3 / rate,
                  "peak_gib": 1.0, "loss_last": 3.0}
            scale.fill(res, tp, lay[name], flops_per_token=1e12, ceiling=500.0)
        else:
            res.status = status
        return res

    runs = [run("single", 100.0), run("fsdp", 96.0), run("ep", 88.0),
            run("single", 104.0), run("fsdp", 90.0), run("ep", 0.0, "timeout"),
            run("single", 98.0), run("fsdp", 97.0), run("ep", 93.0)]
    runs[4].comm = {"nccl_ms_by_kind": {}, "nccl_share_of_wall": 0.1}  # a profiled run that is not the median
    rows = {r.layout: r for r in scale.aggregate(runs)}
    assert [r for r in rows] == ["single", "fsdp", "ep"]
    assert rows["single"].tokens_per_s_per_gpu == 100.0 and rows["single"].runs_per_gpu == [98.0, 100.0, 104.0]
    assert rows["fsdp"].tokens_per_s_per_gpu == 96.0 and rows["fsdp"].efficiency == pytest.approx(0.96)
    assert rows["ep"].runs_per_gpu == [88.0, 93.0] and rows["ep"].tokens_per_s_per_gpu == 88.0  # lower middle
    assert rows["fsdp"].mfu == pytest.approx(1e12 * 96 / 500e12)
    table = scale.markdown(list(rows.values()), {"preset": "tiny", "seq": 64, "micro_batch": 2, "compile": False,
                                                 "timed": 8, "warmup": 4, "dtype": "bf16", "ceiling_tflops": None,
                                                 "device": "cpu"})
    assert "| fsdp (median of 3 runs, per GPU 90-97) | 2 | 192 | 96 | 97 | 96.0% |" in table
    assert "tokens/s per GPU against fsdp (median windows in parentheses): ep 91.7% (91.8%)" in table
    assert "| ep (median of 2 runs, per GPU 88-93) **1 more run(s) failed** | 2 |" in table
    assert rows["fsdp"].runs_failed == 0 and rows["fsdp"].comm is runs[4].comm and rows["ep"].comm is None
    assert "| 1.0 | 10.0% | - |" in table
    failed = scale.aggregate([run("ep", 0.0, "exit 1")])
    assert failed[0].status == "exit 1" and failed[0].runs_per_gpu == [] and failed[0].efficiency is None


def test_layouts_and_arguments():
    assert scale.layout("single", 2) == scale.Layout("single", 1, ("parallel=single",), 1)
    assert scale.layout("tp", 4).dp == 2 and scale.layout("ep", 4).dp == 4
    assert scale.layout("hsdp", 4).overrides[-1] == "parallel.dp_shard=2"
    assert scale.layout("ep_padded", 2).overrides[-1] == "parallel.ep_exchange=padded"
    assert scale.layout("ep_overlap", 2).overrides[-1] == "parallel.ep_exchange=overlap"
    with pytest.raises(ValueError, match="unknown layout 'bogus'"):
        scale.layout("bogus", 2)
    args = scale.parse_args(["--layouts", "single,tp", "--device", "cpu"])
    assert args.layouts == ["single", "tp"] and args.comm_profile == ["tp"] and args.ceiling_size == 0
    over = scale.train_overrides(args, scale.layout("tp", 2), Path("/x"))
    assert "train.global_batch_tokens=16384" in over and "checkpoint.save_final=false" in over
    assert "optim.lr=3e-05" in over and "optim.schedule=constant" in over  # a real run's early LR (--lr)
    cmds = scale.main(["--dry-run", "--layouts", "single,ep"])["commands"]
    assert [c[4] for c in cmds] == ["--nproc_per_node=1", "--nproc_per_node=2"] and "parallel.ep=2" in cmds[1]
    assert scale.parse_args(["--repeat", "3"]).repeat == 3
    # a comm profile warms up as long as the timed runs (expert biases move every step), unless told otherwise
    assert scale.parse_args(["--warmup", "32", "--steps", "48"]).profile_warmup == 32
    assert scale.parse_args(["--warmup", "32", "--steps", "48", "--profile-warmup", "3"]).profile_warmup == 3
    for bad in (["--log-every", "3"], ["--warmup", "12"], ["--layouts", "single,zero"], ["--gpus", "3"],
                ["--repeat", "0"], ["--variant", "fsdp;x=1"], ["--variant", "v=fsdp;nokey"],
                ["--variant", "ep=fsdp;x=1"], ["--variant", "v=bogus", "--layouts", "v"],
                ["--variant", "v=fsdp", "--layouts", "fsdp"], ["--variant", "v=fsdp", "--variant", "v=ep",
                                                               "--layouts", "v"]):
        with pytest.raises(SystemExit):
            scale.parse_args(bad)


def test_variant_is_a_layout_plus_overrides_and_environment():
    args = scale.parse_args(["--layouts", "fsdp,v", "--variant",
                             "v=ep; parallel.ep_exchange=padded ;env:NCCL_MAX_CTAS=8;curriculum.stages=[{a: 1, b: 2}]"])
    lay = scale.layout("v", 2, args.variants)
    assert lay == scale.Layout("v", 2, ("parallel=ep", "parallel.ep=2", "parallel.ep_exchange=padded",
                                        "curriculum.stages=[{a: 1, b: 2}]"), 2, (("NCCL_MAX_CTAS", "8"),))
    cmd = scale.main(["--dry-run", "--layouts", "v", "--variant", "v=single;model.num_hidden_layers=2",
                      "--set", "data.num_workers=0"])["commands"][0]
    assert "--nproc_per_node=1" in cmd and cmd[-1] == "data.num_workers=0"  # --set still comes last
    assert cmd.index("parallel=single") < cmd.index("model.num_hidden_layers=2") < len(cmd) - 1
    with pytest.raises(ValueError, match="unknown base layout 'bogus'"):
        scale.layout("v", 2, {"v": scale.parse_variant("v=bogus")})


def test_nccl_kernel_kinds_and_shares():
    assert comm_profile.nccl_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)") \
        == "AllReduce"
    assert comm_profile.nccl_kind("ncclKernel_ReduceScatter_RING_LL_Sum_float") == "ReduceScatter"
    assert comm_profile.nccl_kind("ncclDevKernel_SendRecv(...)") == "SendRecv"
    assert comm_profile.nccl_kind("sm90_xmma_gemm_bf16bf16") is None
    assert comm_profile.nccl_kind("nccl:all_reduce") is None  # a profiler range, not a kernel: no double count
    s = comm_profile.summarize([("ncclDevKernel_AllReduce_Sum", 6.0), ("gemm", 10.0), ("ncclDevKernel_AllGather", 2.0)],
                               wall_ms=40.0, steps=2)
    assert s["nccl_ms_per_step"] == 4.0 and s["nccl_ms_by_kind"] == {"AllReduce": 3.0, "AllGather": 1.0}
    assert s["nccl_share_of_wall"] == pytest.approx(0.2) and s["nccl_share_of_kernels"] == pytest.approx(8 / 18)



def test_timeline_separates_hidden_and_exposed_communication():
    from trainer.profile import timeline, timeline_line

    # wall 0-100 us. Compute on one stream: 0-30, 20-40 (overlapping launches), 60-80. NCCL on another:
    # an all-gather 10-35 under compute, a reduce-scatter 35-50 (5 us under compute, 10 not), an all-to-all
    # 85-95 with nothing to hide it. Nothing runs 50-60, 80-85, 95-100: 20 us idle.
    k = [("gemm", 0, 30), ("sm90_xmma", 20, 40), ("triton_poi", 60, 80),
         ("ncclDevKernel_AllGather_RING_LL", 10, 35), ("ncclKernel_ReduceScatter_Sum_float", 35, 50),
         ("ncclDevKernel_SendRecv", 85, 95)]
    t = timeline(k, wall_us=100.0)
    assert t["compute_us"] == 60 and t["comm_us"] == 50
    assert t["exposed_comm_us"] == 20 and t["overlapped_comm_us"] == 30 and t["idle_us"] == 20
    assert "NCCL not hidden by compute 20.0%" in timeline_line(t) and "device idle 20.0%" in timeline_line(t)
    # a kernel nested in another and identical intervals count once
    t = timeline([("a", 0, 10), ("b", 2, 5), ("c", 0, 10)], wall_us=10.0)
    assert t["compute_us"] == 10 and t["idle_us"] == 0 and t["exposed_comm_us"] == 0


def test_idle_gaps_group_the_stretches_with_no_kernel_by_the_kernels_around_them():
    from trainer.profile import idle_gaps

    # 0-10 gemm, gap 15, 25-30 sendrecv (an all-to-all after a host sync), 28-40 silu under it, gap 10,
    # 50-55 gemm, gap 15, 70-80 sendrecv, then 5 us to a tiny kernel: under min_us, not a gap
    k = [("gemm", 0, 10), ("ncclDevKernel_SendRecv", 25, 30), ("silu", 28, 40), ("gemm", 50, 55),
         ("ncclDevKernel_SendRecv", 70, 80), ("tiny", 85, 86)]
    g = idle_gaps(k, min_us=8.0)
    assert g["gaps"] == 3 and g["idle_us"] == 40
    first = g["top"][0]
    assert (first["after"], first["before"], first["count"], first["us"]) == ("gemm", "ncclDevKernel_SendRecv", 2, 30)
    assert (g["top"][1]["after"], g["top"][1]["before"], g["top"][1]["us"]) == ("silu", "gemm", 10)
    assert idle_gaps(k, min_us=20.0)["gaps"] == 0 and idle_gaps([])["top"] == []


def test_host_bound_idle_counts_a_gap_until_the_host_issued_what_ends_it():
    from trainer.profile import host_bound_idle

    def op(name, ts, dur, corr, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def call(ts, corr, cat="cuda_runtime"):
        return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 4, "args": {"correlation": corr}}

    events = [
        op("gemm", 0, 100, 1), call(-20, 1),
        # gap 100-160: issued at 150 (after a host sync, say): 50 us host-bound, 10 us launch to start
        op("ncclDevKernel_SendRecv", 160, 40, 2), call(150, 2),
        # gap 200-300: issued at 50, long before: the device waited on itself (another stream, a peer)
        op("silu", 300, 10, 3), call(50, 3, cat="cuda_driver"),
        # gap 310-330, a copy issued at 325 by the driver API: 15 us host-bound
        op("Memcpy DtoD", 330, 5, 4, cat="gpu_memcpy"), call(325, 4, cat="cuda_driver"),
        # gap 335-400 before an operation whose host call is not in the trace
        op("gemm", 400, 10, 5),
        # 5 us to the next: under min_us; CPU ops and annotations are not device time
        op("tiny", 415, 1, 6), call(405, 6), {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 120, "dur": 500},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "nccl:all_to_all", "ts": 100, "dur": 400},
    ]
    h = host_bound_idle(events, min_us=8.0)
    assert h["gaps"] == 4 and h["idle_us"] == 60 + 100 + 20 + 65
    assert h["host_bound_us"] == 50 + 15 and h["host_bound_gaps"] == 2 and h["unattributed_us"] == 65
    top = [(t["after"], t["before"], t["count"], t["us"]) for t in h["top"]]
    assert top == [("gemm", "ncclDevKernel_SendRecv", 1, 50), ("silu", "Memcpy DtoD", 1, 15)]
    assert host_bound_idle([])["gaps"] == 0
    # what the host ran meanwhile: the item() copy covers 100-140 of the first stretch (100-150), aten::mm (120-620)
    # 120-150 of it and all of the second (310-325), the compiled region both; ProfilerStep is left out
    events += [{"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 90, "dur": 50},
               {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#3", "ts": 0, "dur": 1000},
               {"ph": "X", "cat": "python_function", "name": "Torch-Compiled Region", "ts": 95, "dur": 400}]
    ops = {o["op"]: o["us"] for o in host_bound_idle(events, min_us=8.0)["host_ops"]}
    assert ops == {"aten::mm": 30 + 15, "aten::item": 40, "Torch-Compiled Region": 50 + 15}, ops


def test_device_kernels_leave_out_gpu_annotations():
    import torch
    from types import SimpleNamespace as NS

    from trainer.profile import device_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = [NS(name="gemm", device_type=cuda, time_range=NS(start=0, end=5), is_user_annotation=False),
          NS(name="nccl:all_reduce", device_type=cuda, time_range=NS(start=5, end=9), is_user_annotation=True),
          NS(name="aten::mm", device_type=cpu, time_range=NS(start=0, end=9), is_user_annotation=False)]
    assert device_kernels(NS(events=lambda: ev)) == [("gemm", 0, 5)]

@pytest.mark.slow
def test_cpu_run_single_and_fsdp(tmp_path):
    """The whole script on CPU: a 1-process and a 2-process (gloo) run of the tiny model."""
    out = tmp_path / "scale.json"
    cmd = [sys.executable, "-m", "launch.scale", "--device", "cpu", "--preset", "tiny", "--seq", "64",
           "--micro-batch", "2", "--steps", "4", "--warmup", "2", "--log-every", "2", "--layouts",
           "single,fsdp,fsdp_root_head", "--variant", "fsdp_root_head=fsdp;parallel.fsdp_lm_head_unit=false;"
           "env:JAMBA_SCALE_TEST=1", "--comm-profile", "none", "--out-dir",
           str(tmp_path / "runs"), "--json", str(out), "--md", str(tmp_path / "scale.md"), "--set",
           "train.num_threads=1", "--timeout", "240"]
    r = run_tree(cmd, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    single, fsdp, variant = rep["results"]
    assert (single["layout"], single["gpus"], fsdp["layout"], fsdp["gpus"]) == ("single", 1, "fsdp", 2)
    assert (variant["layout"], variant["gpus"], variant["env"]) == ("fsdp_root_head", 2, ["JAMBA_SCALE_TEST=1"])
    assert "parallel.fsdp_lm_head_unit=false" in variant["command"]
    assert "fsdp_lm_head_unit: false" in (Path(variant["run_dir"]) / ".hydra" / "config.yaml").read_text()
    for res in (single, fsdp, variant):
        assert res["status"] == "ok" and res["timed_steps"] == 2 and res["tokens_per_s"] > 0, res
        assert math.isfinite(res["loss_last"])
    assert single["efficiency"] == 1.0
    assert fsdp["efficiency"] == pytest.approx(fsdp["tokens_per_s"] / 2 / single["tokens_per_s"])
    assert rep["meta"]["flops_per_token"] > 0 and rep["meta"]["ceiling_tflops"] is None
    assert (tmp_path / "scale.md").read_text().strip() == rep["markdown"].strip()
    assert "| fsdp | 2 |" in rep["markdown"] and "| fsdp | 2 |" in r.stdout


def test_comm_profile_one_process(tmp_path):
    """The profiling worker composes train.py's config from the same overrides and profiles real steps (one
    process on CPU: no NCCL kernels, so the shares are 0; on GPUs launch.scale runs it under torchrun)."""
    out = tmp_path / "comm.json"
    res = comm_profile.main([f"--out={out}", "--warmup=1", "--steps=2", "--", "model=tiny", "train.device=cpu",
                             "curriculum.stages=[{seq_len: 32, micro_batch_size: 2}]", "train.global_batch_tokens=64"])
    assert json.loads(out.read_text()) == res
    assert res["steps"] == 2 and res["wall_ms_per_step"] > 0 and res["world_size"] == 1
    assert res["nccl_ms_per_step"] == 0 and res["nccl_share_of_wall"] == 0


def test_a_run_past_its_timeout_leaves_the_workers_stacks(tmp_path):
    """A stand-in torchrun (a parent with one worker that hangs in `stuck_in_a_collective`): past --timeout
    the worker's Python stack is in the log (5 s: time enough for the two interpreters to start on a busy CPU)."""
    worker = "import time\ndef stuck_in_a_collective():\n    time.sleep(600)\nstuck_in_a_collective()\n"
    agent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {worker!r}])\n"
    env = dict(__import__("os").environ, PYTHONFAULTHANDLER="1")
    code, wall = scale.run_logged([sys.executable, "-c", agent], tmp_path / "log", timeout=5, env=env)
    log = (tmp_path / "log").read_text()
    assert code is None and wall < 30
    assert "Fatal Python error: Aborted" in log and "stuck_in_a_collective" in log, log


def test_a_variant_of_single_is_the_baseline_when_it_is_the_only_one_gpu_layout():
    """--layouts single_b2,fsdp_b2 (variants sharing a model setting): the efficiency column is against single_b2;
    with two 1-GPU variants and no "single" there is no baseline rather than an arbitrary one."""
    one = scale.Layout("single_b2", 1, ("parallel=single", "model.moe_router_bias_update_rate=0.01"), 1)
    two = scale.Layout("fsdp_b2", 2, ("parallel=fsdp", "model.moe_router_bias_update_rate=0.01"), 2)

    def run(lay, rate):
        res = scale.Result(lay.name, lay.gpus)
        tp = {"tokens_per_s": rate * lay.gpus, "median_window_tokens_per_s": rate * lay.gpus, "timed_steps": 8,
              "step_ms": 10.0, "peak_gib": 1.0, "loss_last": 3.0}
        scale.fill(res, tp, lay, flops_per_token=1e12, ceiling=500.0)
        return res

    rows = {r.layout: r for r in scale.aggregate([run(one, 100.0), run(two, 97.0)])}
    assert rows["fsdp_b2"].efficiency == pytest.approx(0.97) and rows["single_b2"].efficiency == 1.0
    other = scale.Layout("single_b3", 1, ("parallel=single",), 1)
    rows = {r.layout: r for r in scale.aggregate([run(one, 100.0), run(other, 90.0), run(two, 97.0)])}
    assert rows["fsdp_b2"].efficiency is None
    # a failed "single" is no baseline, and the variant does not silently stand in for it
    failed = scale.Result("single", 1, status="exit 1")
    rows = {r.layout: r for r in scale.aggregate([failed, run(one, 100.0), run(two, 97.0)])}
    assert rows["fsdp_b2"].efficiency is None


def test_the_against_fsdp_line_uses_the_only_fsdp_variant():
    """--layouts fsdp_b2,ep_b2: the ratios are against fsdp_b2 (a variant of fsdp); a failed fsdp gives none."""
    def row(name, gpus, rate, command=(), status="ok"):
        return scale.Result(name, gpus, status=status, tokens_per_s_per_gpu=rate, median_window_per_gpu=rate,
                            command=list(command))

    meta = {"preset": "tiny", "seq": 64, "micro_batch": 2, "compile": False, "timed": 8, "warmup": 4,
            "dtype": "bf16", "ceiling_tflops": 500.0, "device": "cpu"}
    fsdp_b2 = row("fsdp_b2", 2, 100.0, ["train.py", "parallel=fsdp", "model.moe_router_bias_update_rate=0.01"])
    ep_b2 = row("ep_b2", 2, 95.0, ["train.py", "parallel=ep", "parallel.ep=2"])
    assert "tokens/s per GPU against fsdp_b2 (median windows in parentheses): ep_b2 95.0% (95.0%)" in \
        scale.markdown([fsdp_b2, ep_b2], meta)
    failed = row("fsdp", 2, None, ["train.py", "parallel=fsdp"], status="exit 1")
    assert "tokens/s per GPU against" not in scale.markdown([failed, fsdp_b2, ep_b2], meta)


def test_pair_waits_split_an_all_to_all_into_the_exchange_and_the_wait_for_later_ranks():
    from trainer.profile import pair_waits

    # exchange 1: rank 0 waited 3 for rank 1 (2 to move the rows); exchange 2: rank 1 waited 5 (1 to move them)
    pw = pair_waits([[5.0, 1.0], [2.0, 6.0]])
    assert pw["count"] == 2 and pw["exchange"] == 3.0 and pw["wait_by_rank"] == [3.0, 5.0]
    assert pw["total_by_rank"] == [6.0, 8.0] and pw["counts_by_rank"] == [2, 2]
    # ranks that ran different numbers: only the common prefix is paired, the counts say so
    pw = pair_waits([[1.0, 4.0, 9.0], [2.0, 2.0]])
    assert pw["count"] == 2 and pw["counts_by_rank"] == [3, 2] and pw["exchange"] == 3.0
    assert pw["wait_by_rank"] == [2.0, 1.0] and pw["total_by_rank"] == [5.0, 4.0]


def test_comm_profile_reads_host_bound_idle_from_a_real_exported_trace(tmp_path):
    """The export-and-parse path on a real (CPU) profiler run: no device operations there, so no gaps, but the
    trace is read and the result has its per-step fields (on CUDA the same code sees kernels and launches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from launch.comm_profile import _host_bound

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    h = _host_bound(prof, steps=2)
    assert h["gaps"] == 0 and h["idle_ms_per_step"] == 0 and h["host_bound_ms_per_step"] == 0
    assert h["unattributed_ms_per_step"] == 0 and h["top"] == [] and h["host_ops"] == []
    # the host operations are found under the category the parser reads (no gaps here, so none is listed above)
    from trainer.profile import _HOST_OP_CATS

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # a trace is exported once: profile again
        torch.randn(64, 64) @ torch.randn(64, 64)
    trace = tmp_path / "t.json"
    prof.export_chrome_trace(str(trace))
    cats = {e.get("cat") for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "aten::mm"}
    assert cats & set(_HOST_OP_CATS), cats
