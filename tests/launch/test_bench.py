"""CPU smoke tests of launch/bench.py's machinery (tiny preset, one step). Benchmarks are not timed tests."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import bench

REPO = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--preset", "tiny", "--warmup", "0", "--steps", "1", "--ceiling-size", "64"]


def test_parse_points_and_ac():
    pts = bench.parse_points("4096x4, 16384x1,65536x1@all,8192x2@mamba+moe", default_ac=("moe",))
    assert [(p.seq_len, p.micro_batch, p.ac) for p in pts] == [
        (4096, 4, ("moe",)), (16384, 1, ("moe",)), (65536, 1, ("all",)), (8192, 2, ("mamba", "moe"))]
    assert bench.parse_ac("none") == () and bench.parse_ac("mamba,all") == ("all",)
    for bad in ("4096", "4096x0", "1x4", "4096x4@bogus", ""):
        with pytest.raises(ValueError):
            bench.parse_points(bad)


def test_cpu_smoke_ours_and_hf_same_function(tmp_path, capsys):
    """Both implementations train one step from the same weights; their first losses agree (fp32 on CPU),
    so the benchmark compares the same model. Also the table, the JSON file and HF's checkpointing flag."""
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--points", "16x2,16x1@all", "--hf", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"], default=str))
    res = report["results"]
    assert [(r["impl"], r["seq_len"], r["micro_batch"], r["ac"]) for r in res] == [
        ("ours", 16, 2, "none"), ("hf", 16, 2, "none"), ("ours", 16, 1, "all"), ("hf", 16, 1, "all")]
    for r in res:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] > 0
    for ours, hf in ((res[0], res[1]), (res[2], res[3])):
        assert ours["loss_first"] == pytest.approx(hf["loss_first"], rel=1e-4, abs=1e-4)
    assert res[1]["info"]["gradient_checkpointing"] is False and res[3]["info"]["gradient_checkpointing"] is True
    assert report["ceiling_tflops"] > 0
    text = capsys.readouterr().out
    assert "ours/HF" in text and "16x2" in text


def test_profile_lists_top_ops_and_families(capsys):
    report = bench.main([*TINY, "--points", "16x1", "--profile", "--profile-top", "5", "--ceiling-size", "0"])
    (prof,) = report["profiles"]
    assert prof["impl"] == "ours" and 0 < len(prof["top"]) <= 5 and prof["families"]
    assert sum(f["pct"] for f in prof["families"]) == pytest.approx(100.0, abs=0.5)
    assert "by family:" in capsys.readouterr().out


def test_find_max_seq_stops_at_first_oom(monkeypatch):
    """The search keeps the longest length that trained and stops at the first out-of-memory error."""
    real_make_step = bench.make_step

    def make_step(impl, model, opt):
        step = real_make_step(impl, model, opt)

        def oom_above_64(batch):
            if batch[0].shape[1] > 64:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return step(batch)
        return oom_above_64

    monkeypatch.setattr(bench, "make_step", make_step)
    report = bench.main([*TINY, "--find-max-seq", "--max-seq-list", "32,64,128,256", "--ac", "all",
                         "--ceiling-size", "0"])
    (r,) = report["max_seq"]
    assert r["impl"] == "ours" and r["ac"] == "all" and r["max_ok"] == 64
    assert [t["status"] for t in r["tries"]] == ["ok", "ok", "oom"]


def test_script_entry_point_runs_from_any_directory(tmp_path):
    """`python launch/bench.py` works outside the repository root (it puts the root on sys.path)."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "bench.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--find-max-seq" in proc.stdout


def test_trace_timeline_busy_idle_and_gaps(tmp_path):
    """Busy time is the union of kernel intervals (overlaps counted once); gaps are listed longest first."""
    events = [{"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
              {"cat": "kernel", "name": "b", "ts": 5, "dur": 10},      # overlaps a: busy 0..15
              {"cat": "gpu_memset", "name": "m", "ts": 115, "dur": 5},  # 100 us gap after b
              {"cat": "kernel", "name": "c", "ts": 140, "dur": 60},     # 20 us gap after m
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]  # not a device event
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    t = bench.trace_timeline(path)
    assert t["span_ms"] == pytest.approx(0.2) and t["busy_ms"] == pytest.approx(0.08)
    assert t["idle_ms"] == pytest.approx(0.12) and t["kernels"] == 4
    assert t["gaps_over_50us"] == 1 and t["idle_in_gaps_over_50us_ms"] == pytest.approx(0.1)
    assert [(g["us"], g["after"], g["before"]) for g in t["top_gaps"]] == [(100, "b", "m"), (20, "m", "c")]


def test_kernel_families_name_both_scans_and_routing_apart():
    assert bench.kernel_family("void jamba_scan::scan_bwd_kernel<c10::BFloat16, 4, true>(jamba_scan::Params)") \
        == "selective scan (ours / mamba-ssm)"
    assert bench.kernel_family("void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits<...>>") \
        == "selective scan (ours / mamba-ssm)"
    assert bench.kernel_family("void at::native::radixSortKVInPlace<...>") == "MoE routing (topk/sort/scatter/index)"
    assert bench.kernel_family("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT") == "GEMM (cuBLAS/CUTLASS)"


def test_trainer_recipe_runs_train_py_numerics():
    """--trainer-recipe: fp32 weights (autocast on CUDA) and gradient clipping, as train.py trains on one GPU;
    it refuses a weights dtype other than fp32."""
    report = bench.main([*TINY, "--points", "32x2", "--trainer-recipe", "--ceiling-size", "0"])
    (r,) = report["results"]
    assert r["status"] == "ok" and all(math.isfinite(x) for x in r["losses"])
    assert report["args"]["dtype"] == "fp32" and report["args"]["trainer_recipe"]
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--trainer-recipe", "--dtype", "bf16"])


def test_git_version_marks_uncommitted_changes(tmp_path):
    """Benchmark JSON records the commit; measured on a modified checkout it must say so ("-dirty")."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                       cwd=tmp_path, check=True,
                       capture_output=True)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert bench.git_version(tmp_path) == head
    (tmp_path / "f.txt").write_text("b\n")
    assert bench.git_version(tmp_path) == head + "-dirty"
    assert bench.git_version(tmp_path / "f.txt") is None  # not a directory: no version, no exception
