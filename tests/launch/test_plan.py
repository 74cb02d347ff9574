"""The memory and time planner (launch/plan*.py) against the measured points of launch/plan_points.jsonl.

Tolerances: the issue asks for peak memory within 10% of every measured point; the fitted constants give
-0.7% to +1.2% on every one-GPU point, +1.9% to +4.6% on the 2-GPU FSDP and EP points, and cp=2 at 256K is
the worst (+7.7%, predicted 47.6 GiB, measured 44.2; at 1M the same layout is within 0.4%); python -m launch.plan --calibrate prints the table. 10% leaves
room for a new point to show a modelling gap without making this test the place where it is tuned.
Tokens/s is held to the same 10% (the fit gives -1.6% to +8.4%, the worst again cp=2 at 256K). Pure arithmetic on configs: no model is built (except on the meta device
by jamba.flops for parameter counts), nothing depends on the CPU's vector width.
"""

import json
from dataclasses import replace

import pytest
import torch

from jamba.config import ConfigError, get_preset
from jamba.flops import param_counts
from launch import plan
from launch.plan_layout import GPUS, Setup, layer_param_counts, scan_state_interval
from launch.plan_memory import plan_memory
from launch.plan_time import plan_time

POINTS = plan.load_points()
ROWS = {r["id"]: r for r in plan.point_errors(POINTS)}


@pytest.mark.parametrize("point", [p for p in POINTS if p.peak_gib], ids=lambda p: p.id)
def test_peak_memory_within_10_percent_of_measured(point):
    r = ROWS[point.id]
    assert abs(r["mem_err"]) <= 0.10, f"{point.id}: predicted {r['pred_gib']:.1f} GiB, measured {point.peak_gib}"


@pytest.mark.parametrize("point", [p for p in POINTS if p.status == "oom" or not (p.peak_gib or p.tokens_per_s)],
                         ids=lambda p: p.id)
def test_fit_verdicts_match_measured_runs(point):
    """An out-of-memory run must be predicted not to fit; a run that trained (no peak recorded) to fit."""
    mem = plan_memory(point.setup)
    assert mem.fits(point.setup) == (point.status == "ok"), (point.id, mem.peak_gib)


@pytest.mark.parametrize("point", [p for p in POINTS if p.tokens_per_s], ids=lambda p: p.id)
def test_tokens_per_s_within_10_percent_of_measured(point):
    r = ROWS[point.id]
    assert abs(r["tps_err"]) <= 0.10, f"{point.id}: predicted {r['pred_tps']:,.0f}, measured {point.tokens_per_s}"


def test_points_file_covers_the_issue_points():
    ids = {p.id for p in POINTS}
    assert {"bench-4096x4", "bench-16384x1", "bench-65536x1-ac", "bench-max-393216", "bench-oom-458752",
            "bench-327680", "bench-327680-eager", "train-h200-4096x4"} <= ids
    assert all(p.source for p in POINTS)


def test_a_measured_point_is_one_line(tmp_path):
    """The lead's 2-GPU cp=2 run becomes one line; layout keys and the GPU's ceiling are read."""
    line = {"id": "cp2-1m", "model": "bench-3b", "set": {"activation_checkpointing": ["all"], "moe_token_chunk": 65536},
            "seq": 1048576, "cp": 2, "weights": "fp32-master", "gpu": "h200", "matmul_tflops": 700.0,
            "peak_gib": 100.0, "tokens_per_s": 9000, "source": "test"}
    f = tmp_path / "points.jsonl"
    f.write_text(json.dumps(line) + "\n")
    (p,) = plan.load_points(f)
    assert (p.setup.cp, p.setup.world, p.setup.tokens_per_rank, p.setup.gpu.matmul_tflops) == (2, 2, 524288, 700.0)
    (row,) = plan.point_errors([p])
    assert "mem_err" in row and "tps_err" in row
    f.write_text(json.dumps({**line, "seq": 1048575}) + "\n")
    with pytest.raises(ConfigError, match="line 1.*divisible by parallel.cp=2"):
        plan.load_points(f)


@pytest.mark.parametrize("name", ["tiny", "bench-3b", "jamba-v0.1"])
def test_parameter_counts_from_the_config_equal_the_model(name):
    cfg = get_preset(name)
    top, layers = layer_param_counts(cfg)
    assert sum(d + e for d, e in layers) + sum(top.values()) == param_counts(cfg)["total"]
    assert sum(e for _, e in layers) == param_counts(cfg)["experts"]


@pytest.mark.parametrize("shape", [(1, 4096, 16384), (4, 4096, 4096), (1, 4096, 65536), (1, 4096, 65552),
                                   (1, 2048, 524288), (2, 1024, 393216)])
def test_scan_state_interval_is_the_kernels_rule(shape, monkeypatch):
    from jamba.ops.selective_scan_cuda import state_interval

    monkeypatch.delenv("JAMBA_SCAN_STATE_EVERY", raising=False)
    assert scan_state_interval(*shape) == state_interval(torch.empty(shape, device="meta"))


def _bench_1m(cp, **kw):
    m = get_preset("bench-3b", activation_checkpointing=["all"], moe_token_chunk=65536)
    return Setup(m, seq_len=1 << 20, cp=cp, gpu=GPUS["h200"], **kw)


def test_context_parallelism_divides_activations_and_costs_all_to_alls():
    one, two, four, eight = (plan_memory(_bench_1m(cp)) for cp in (1, 2, 4, 8))
    act = [p.parts["activations"] for p in (two, four, eight)]  # (one rank has no FSDP and an fp32 stream)
    # about halved per doubling; less where a fixed-size MoE chunk (65,536 tokens) is a larger share of the peak
    assert 1.95 < act[0] / act[1] < 2.05 and 1.7 < act[1] / act[2] < 2.0
    assert not one.fits(_bench_1m(1)) and two.fits(_bench_1m(2))  # 1M tokens need cp >= 2 on H200s (DESIGN)
    t1, t2 = plan_time(_bench_1m(1)), plan_time(_bench_1m(2))
    assert t1.parts["cp all-to-all"] == 0 < t2.parts["cp all-to-all"]
    # per GPU, cp=2 does half the work in about half the time: within the all-to-all share
    assert t2.tokens_per_s_per_gpu == pytest.approx(t1.tokens_per_s_per_gpu, rel=0.1)



def test_fsdp_settings_kept_weights_and_bf16_reduction():
    """parallel.reshard_after_forward=false keeps every layer's gathered bf16 weights from forward to backward,
    checkpointed or not; parallel.reduce_dtype=bfloat16 halves the reduce-scatter input. Both come from the
    Hydra config (make_setup), as train.py reads them."""
    m = get_preset("bench-3b")
    base = Setup(m, seq_len=4096, micro_batch=4, dp_shard=2, gpu=GPUS["h200"])
    unsharded_bf16 = 2 * sum(d + e for d, e in layer_param_counts(m)[1]) / 2**30
    for ac in ([], ["all"]):  # checkpointed layers keep them too (autocast's copies of those are re-made)
        mac = get_preset("bench-3b", activation_checkpointing=ac)
        kept = plan_memory(Setup(mac, seq_len=4096, micro_batch=4, dp_shard=2, gpu=GPUS["h200"],
                                 reshard_after_forward=False))
        assert kept.where == "backward of layer 15 (moe)"  # the first backward: every layer's weights alive
        assert kept.parts["weight copies"] == pytest.approx(unsharded_bf16, rel=1e-6)
    # measured on 2 H200s: 52.5 -> 57.9 GiB (launch/plan_points.jsonl)
    assert 0.9 * unsharded_bf16 < plan_memory(replace(base, reshard_after_forward=False)).peak_gib \
        - plan_memory(base).peak_gib <= unsharded_bf16
    bf16 = plan_memory(Setup(m, seq_len=4096, micro_batch=4, dp_shard=2, gpu=GPUS["h200"], reduce_bf16=True))
    assert bf16.peak_gib < plan_memory(base).peak_gib
    cfg = plan.compose(["model=bench-3b", "parallel=fsdp", "parallel.reshard_after_forward=false",
                         "parallel.reduce_dtype=bfloat16"])
    s = plan.make_setup(cfg, 4096, 4, 2, GPUS["h200"], "fp32-master", True)
    assert not s.reshard_after_forward and s.reduce_bf16
    s = plan.make_setup(plan.compose(["model=bench-3b", "parallel=fsdp"]), 4096, 4, 2, GPUS["h200"],
                        "fp32-master", True)
    assert s.reshard_after_forward and not s.reduce_bf16


def test_padded_ep_exchange_costs_ep_times_the_rows_and_bytes():
    """parallel.ep_exchange=padded: each rank's experts hold ep x its routed rows and the all-to-alls move ep x
    the bytes; the GEMM work (padding skipped) is the same."""
    m = get_preset("bench-3b")
    sized = Setup(m, seq_len=4096, micro_batch=4, dp_shard=2, ep=2, gpu=GPUS["h200"])
    padded = replace(sized, ep_padded=True)
    assert plan_memory(padded).parts["activations"] > plan_memory(sized).parts["activations"]
    ts, tpad = plan_time(sized), plan_time(padded)
    assert tpad.parts["ep all-to-all"] == pytest.approx(2 * ts.parts["ep all-to-all"])
    assert tpad.parts["gemm"] == ts.parts["gemm"]
    cfg = plan.compose(["model=bench-3b", "parallel=ep", "parallel.ep_exchange=padded"])
    assert plan.make_setup(cfg, 4096, 4, 2, GPUS["h200"], "fp32-master", True).ep_padded

def test_experts_outside_torch_compile_keep_eager_activations():
    """Under ep (or tp) the experts run outside torch.compile, so a compiled model's MoE layers keep silu(g),
    u, g and h (4 I bytes per routed row) where a single-process compiled one keeps 2 I: the 2-GPU EP points
    of launch/plan_points.jsonl were predicted 6.9% and 12.1% (padded) low without this term."""
    from launch.plan_memory import activation_dims, ffn_bytes
    m = get_preset("bench-3b")
    fsdp = Setup(m, seq_len=4096, micro_batch=4, dp_shard=2, gpu=GPUS["h200"])
    ep = replace(fsdp, ep=2)
    saved_fsdp, saved_ep = ffn_bytes(activation_dims(fsdp), "moe")[0], ffn_bytes(activation_dims(ep), "moe")[0]
    assert saved_ep - saved_fsdp == 2 * m.num_experts_per_tok * m.intermediate_size * 2
    assert ffn_bytes(activation_dims(replace(fsdp, compiled=False)), "moe")[0] == saved_ep


def test_layout_errors_name_the_value_and_the_fix():
    m = get_preset("bench-3b")
    with pytest.raises(ConfigError, match="sequence length 1001 must be divisible by parallel.cp=2"):
        Setup(m, seq_len=1001, cp=2)
    with pytest.raises(ConfigError, match=r"parallel.cp=3: d_inner .* must be divisible by tp\(1\) \* cp\(3\)"):
        Setup(m, seq_len=1002, cp=3)  # train.py's checks (parallel/dims.py), not a copy of them
    with pytest.raises(ConfigError, match="sequence_parallel=true with parallel.cp=2 is not supported"):
        Setup(m, seq_len=4096, tp=2, cp=2, sequence_parallel=True)  # the planner's own copy let this through
    with pytest.raises(ConfigError, match="parallel.ep=3 must divide"):
        Setup(m, seq_len=4096, dp_shard=3, ep=3)
    with pytest.raises(ConfigError, match="mamba1"):
        Setup(get_preset("tiny", mamba_mixer="mamba2", mamba2_head_dim=16), seq_len=64)


def test_cli_composes_the_hydra_config_and_searches_cp(capsys):
    """The brief's example: bench-3b at 1M tokens on 2 H200s. One plan (cp=2 fits), and the search over cp,
    which must land on cp=2 (cp=1 cannot hold 1M tokens, DESIGN's measured limit is 655,360)."""
    common = ["experiment=bench_3b", "model.activation_checkpointing=[all]", "model.moe_token_chunk=65536",
              "--seq", "1048576", "--gpus", "2", "--gpu", "h200", "--json"]
    assert plan.main(["parallel.cp=2", *common]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["cp"] == 2 and res["fits"] and 0 < res["tokens_per_s"]
    assert plan.main([*common, "--search"]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["cp"] == 2 and res["fits"]


@pytest.mark.parametrize("gpus,gpu,cp,row", [
    (8, "h200", 8, "| 8 x H200 | none | {peak:.0f} at `cp=8` |"),
    (16, "h200", 8, "| 16 x H200 | `cp=8`, dp_shard=2 | {peak:.0f} | {tps:,.0f} ({tpg:,.0f}) | {mfu:.0f}% |"),
    (64, "h100", 16, "| 64 x H100 80GB | `cp=16`, dp_shard=4 | {peak:.0f} | {tps:,.0f} ({tpg:,.0f}) | {mfu:.0f}% |"),
    (64, "h200", 8, "| 64 x H200 | `cp=8`, dp_shard=8 | {peak:.0f} | {tps:,.0f} ({tpg:,.0f}) | {mfu:.0f}% |"),
])
def test_readme_jamba_predictions_are_the_planners(gpus, gpu, cp, row):
    """The README's jamba-v0.1 1M-token table is what the planner says (tokens/s rounded to hundreds there)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    m = get_preset("jamba-v0.1", activation_checkpointing=["all"], moe_token_chunk=65536)
    s = Setup(m, seq_len=1 << 20, dp_shard=gpus // cp, cp=cp, ep=8, gpu=GPUS[gpu])
    mem, t = plan_memory(s), plan_time(s)
    text = row.format(peak=mem.peak_gib, tps=round(t.tokens_per_s, -2), tpg=t.tokens_per_s_per_gpu,
                      mfu=100 * t.mfu)
    assert text in readme, text
    assert mem.fits(s, 0.05) == (gpus > 8)


@pytest.mark.parametrize("name,seq", [("bench-3b", 16384), ("jamba-v0.1", 4096)])
def test_gemm_and_attention_work_is_jamba_flops(name, seq):
    """Without recomputation the planner's GEMM + attention FLOPs are jamba.flops' training FLOPs (less the scan
    and conv terms, priced by time instead): the time model and MFU count the same work."""
    from jamba.flops import flops_per_token
    from launch import plan_time as pt

    s = Setup(get_preset(name), seq_len=seq, weights="bf16")
    t = plan_time(s)
    ceiling = s.gpu.matmul_tflops * 1e12
    work = (t.parts["gemm"] + t.parts["attention"] * pt.ATTN_EFF) / pt.STEP_OVERHEAD * ceiling / seq
    m = s.model
    scan_conv = 3 * sum(sp.mixer == "mamba" for sp in m.layer_specs()) * (
        9 * m.d_inner * m.mamba_d_state + 2 * m.d_inner * m.mamba_d_conv)
    assert work == pytest.approx(flops_per_token(m, seq) - scan_conv, rel=2e-3)


def test_fsdp_prices_its_own_copies_and_the_collectives_nothing_hides():
    """FSDP2's copies per micro-batch, per parameter before sharding over n ranks: every all-gather 6/n + 4 bytes,
    the reduce-scatter (2 + r) + (r + 4)/n (r: reduce dtype bytes), once per optimizer step. On 2 H200s these
    made FSDP's compute equal one GPU's (README); without them the planner was 15-23% fast on FSDP."""
    from launch.plan_time import _fsdp_copy_bytes, _fsdp_link_bytes

    m = get_preset("bench-3b")
    kept = Setup(m, seq_len=4096, micro_batch=4, dp_shard=2, reshard_after_forward=False, reduce_bf16=True,
                 gpu=GPUS["h200"])
    assert _fsdp_copy_bytes(kept, 1.0) == pytest.approx((3 + 4) + (4 + 3))
    assert _fsdp_copy_bytes(replace(kept, reshard_after_forward=True, reduce_bf16=False), 1.0) == \
        pytest.approx(2 * (3 + 4) + (6 + 4))
    assert _fsdp_copy_bytes(replace(kept, grad_accum=4), 1.0) == pytest.approx(7 + 7 / 4)
    # over the links: bf16 gathers (1 kept, 2 resharded), the reduce-scatter and HSDP's all-reduce in the reduce
    # dtype, once per optimizer step
    assert _fsdp_link_bytes(kept, 1.0) == pytest.approx((2 + 2, 2 / 2))
    assert _fsdp_link_bytes(replace(kept, reshard_after_forward=True, reduce_bf16=False, grad_accum=4), 1.0) \
        == pytest.approx((4 + 4 / 4, 4 / 2 / 4))
    t = plan_time(kept)
    assert t.parts["fsdp copies"] > 0.03 * t.step_s and t.parts["fsdp first gather, last reduce"] > 0
    single = plan_time(Setup(m, seq_len=4096, micro_batch=4, gpu=GPUS["h200"]))
    assert "fsdp copies" not in {k for k, v in single.parts.items() if v}
    # what the measurement showed: FSDP on 2 GPUs is not faster per GPU than one GPU
    assert t.tokens_per_s_per_gpu < 1.05 * single.tokens_per_s_per_gpu


def test_a_typo_is_one_line_as_in_train_py():
    from jamba.config import ConfigError
    from launch.plan import compose

    with pytest.raises(ConfigError, match=r"optim.lrr=1: 'lrr' is not a key of OptimConfig; did you mean 'lr'\?"):
        compose(["experiment=bench_3b", "optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"model='smal' is not a model option"):
        compose(["model=smal"])


@pytest.mark.parametrize("args, match", [
    (["--seq", "0"], r"--seq 0 must be positive"),  # was planned as the default 128 tokens
    (["--micro-batch", "0"], r"--micro-batch 0 must be positive"),  # was the stage's micro-batch
    (["--seq", "-5"], r"--seq -5 must be positive"),
    (["--gpus", "0"], r"--gpus 0 must be positive \(the world size\)"),  # was 'WORLD_SIZE(0)'
    (["--gpu-mem", "0"], r"--gpu-mem 0.0 must be positive"),  # was --gpu's memory
    (["--margin", "2"], r"--margin 2.0 must be in \[0, 1\)"),  # was 'DOES NOT FIT with a 200% margin'
    (["--margin", "-0.1"], r"--margin -0.1 must be in \[0, 1\)"),
])
def test_cli_refuses_values_that_are_no_plan(args, match, monkeypatch):
    def no_compose(overrides):
        raise AssertionError("composed a config for arguments that should have been refused")

    monkeypatch.setattr(plan, "compose", no_compose)
    with pytest.raises(ConfigError, match=match):
        plan.main(args)
