"""Memory and time planner: peak memory per GPU and tokens/s of a training configuration, on CPU, from the
same Hydra config as train.py (no model is built, nothing runs on a GPU).

    python -m launch.plan experiment=bench_3b parallel.cp=2 model.activation_checkpointing=[all] \\
        model.moe_token_chunk=65536 --seq 1048576 --gpus 2 --gpu h200
    python -m launch.plan model=jamba-v0.1 parallel.ep=8 --seq 1048576 --gpus 64 --search   # smallest cp / AC
    python -m launch.plan '~experiment' model=bench-3b curriculum=long_context --gpus 2 --gpu h200 --search  # stages
    python -m launch.plan --calibrate          # refit the constants to launch/plan_points.jsonl, print errors

Positional arguments are Hydra overrides (as for train.py); the options choose what the config does not
say: the sequence (default: the curriculum's longest stage), the GPU count and kind, and `--weights`:
fp32-master (train.py) or bf16 (launch.bench: bf16 weights and AdamW states, one GPU).

`--search` tries cp = 1, 2, 4, ... (the GPU count fixed: dp_shard shrinks as cp grows) with no activation
checkpointing, with it as configured, on every layer ("all"), and "all" with token-chunked MoE layers
(65,536 tokens per chunk unless the config sets one), and reports, per stage, the smallest cp at which the
stage fits and the fastest setting there.

The models (launch/plan_memory.py, launch/plan_time.py) are analytic with a few constants fitted to the
measured points of launch/plan_points.jsonl (one JSON object per line: add a measurement as one line;
`--calibrate` prints how every point is predicted and the refitted constants). They are predictions: the
memory model is validated within a few percent on one H100 (tests/launch/test_plan.py), the communication
terms are not validated yet.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from jamba.config import ConfigError, JambaConfig, get_preset
from launch import plan_memory, plan_time
from launch.plan_layout import GPUS, Setup, human_tokens, layer_param_counts
from launch.plan_memory import MemoryPlan, plan_memory as _plan_memory, usable_gib
from launch.plan_time import TimePlan, plan_time as _plan_time
from parallel.dims import ParallelDims

POINTS = Path(__file__).resolve().parent / "plan_points.jsonl"
DEFAULT_CHUNK = 65536


# ================================================================================================
# Measured points
# ================================================================================================

@dataclass
class Point:
    id: str
    setup: Setup
    peak_gib: Optional[float]
    tokens_per_s: Optional[float]
    status: str
    source: str


_LAYOUT_KEYS = ("dp_replicate", "dp_shard", "tp", "ep", "cp", "sequence_parallel", "grad_accum", "reshard_after_forward",
                "reduce_bf16", "ep_padded")


def load_points(path: Path = POINTS) -> List[Point]:
    """One JSON object per line: id, model (a preset), set (model field overrides), seq, micro_batch, weights,
    gpu (h100 | h200), optional matmul_tflops (the ceiling measured in that run), compiled, first_step, the
    layout degrees, and the measurement: peak_gib, tokens_per_s, status ("ok" | "oom"), source. E.g. a 2-GPU
    train.py run with cp=2 (world = dp_replicate x dp_shard x cp x tp; weights fp32-master is train.py):

        {"id": "train-cp2-1m", "model": "bench-3b", "set": {"activation_checkpointing": ["all"],
         "moe_token_chunk": 65536}, "seq": 1048576, "cp": 2, "weights": "fp32-master", "gpu": "h200",
         "peak_gib": ..., "tokens_per_s": ..., "source": "the command that measured it"}   (on one line)"""
    points = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            d = json.loads(line)
            gpu = GPUS[d["gpu"]]
            if d.get("matmul_tflops"):
                gpu = replace(gpu, matmul_tflops=float(d["matmul_tflops"]))
            setup = Setup(get_preset(d["model"], **d.get("set", {})), seq_len=d["seq"],
                          micro_batch=d.get("micro_batch", 1), weights=d["weights"],
                          compiled=d.get("compiled", True), first_step=d.get("first_step", False), gpu=gpu,
                          **{k: d[k] for k in _LAYOUT_KEYS if k in d})
            points.append(Point(d["id"], setup, d.get("peak_gib"), d.get("tokens_per_s"),
                                d.get("status", "ok"), d["source"]))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path.name} line {n}: {type(e).__name__}: {e}; each line is one JSON object with "
                              "id, model, seq, weights, gpu, source and peak_gib / tokens_per_s / status") from e
    return points


def point_errors(points: Sequence[Point], **constants) -> List[dict]:
    """Per point: predicted and measured peak GiB / tokens/s and the relative errors; for an OOM point whether
    the prediction exceeds the usable memory."""
    mem_kw = {k: constants[k] for k in ("saved_scale", "temp_scale", "fixed_gib") if k in constants}
    time_kw = {k: constants[k] for k in ("step_overhead",) if k in constants}
    rows = []
    for p in points:
        mem = _plan_memory(p.setup, **mem_kw)
        row = {"id": p.id, "pred_gib": mem.peak_gib, "meas_gib": p.peak_gib, "status": p.status,
               "usable_gib": usable_gib(p.setup)}
        if p.peak_gib:
            row["mem_err"] = mem.peak_gib / p.peak_gib - 1
        if p.status == "oom":
            row["oom_predicted"] = not mem.fits(p.setup)
        elif not p.peak_gib and not p.tokens_per_s:  # only "it trained": the prediction must fit
            row["fit_predicted"] = mem.fits(p.setup)
        if p.tokens_per_s:
            t = _plan_time(p.setup, **time_kw)
            row.update(pred_tps=t.tokens_per_s, meas_tps=p.tokens_per_s, tps_err=t.tokens_per_s / p.tokens_per_s - 1)
        rows.append(row)
    return rows


def calibrate(points: Sequence[Point]) -> Dict[str, float]:
    """Least-squares fit of the memory constants (relative errors of the measured peaks; a grid refined
    twice) and the step overhead (geometric mean of measured / predicted tokens/s at overhead 1)."""
    mem_points = [p for p in points if p.peak_gib and p.status == "ok"]

    def loss(a: float, b: float, c: float) -> float:
        return sum((_plan_memory(p.setup, a, b, c).peak_gib / p.peak_gib - 1) ** 2 for p in mem_points)

    center, step = (1.0, 0.5, 1.0), (0.1, 0.25, 0.5)
    for _ in range(3):
        grid = [(center[0] + i * step[0], max(0.0, center[1] + j * step[1]), max(0.0, center[2] + k * step[2]))
                for i in range(-3, 4) for j in range(-3, 4) for k in range(-3, 4)]
        center = min(set(grid), key=lambda abc: loss(*abc))
        step = tuple(s / 4 for s in step)
    logs = [math.log(p.tokens_per_s / _plan_time(p.setup, step_overhead=1.0).tokens_per_s)
            for p in points if p.tokens_per_s]
    overhead = 1.0 / math.exp(sum(logs) / len(logs)) if logs else 1.0
    return {"saved_scale": round(center[0], 4), "temp_scale": round(center[1], 4),
            "fixed_gib": round(center[2], 3), "step_overhead": round(overhead, 4)}


def print_point_table(rows: Sequence[dict], out=sys.stdout) -> None:
    print(f"{'point':<22} {'peak GiB pred / meas':>22} {'err':>7}   {'tokens/s pred / meas':>22} {'err':>7}",
          file=out)
    for r in rows:
        if r.get("meas_gib"):
            mem = f"{r['pred_gib']:6.1f} / {r['meas_gib']:5.1f}", f"{100 * r['mem_err']:+6.1f}%"
        elif r["status"] == "oom":
            verdict = "OOM ok" if r["oom_predicted"] else "MISSED"
            mem = f"{r['pred_gib']:6.1f} > {r['usable_gib']:5.1f}", verdict
        elif "fit_predicted" in r:
            mem = f"{r['pred_gib']:6.1f} <= {r['usable_gib']:5.1f}", "fit ok" if r["fit_predicted"] else "MISSED"
        else:
            mem = f"{r['pred_gib']:6.1f} /     -", ""
        tps = (f"{r['pred_tps']:9,.0f} / {r['meas_tps']:9,.0f}", f"{100 * r['tps_err']:+6.1f}%") \
            if r.get("meas_tps") else ("", "")
        print(f"{r['id']:<22} {mem[0]:>22} {mem[1]:>7}   {tps[0]:>22} {tps[1]:>7}", file=out)


# ================================================================================================
# From the Hydra config to Setups
# ================================================================================================

def compose(overrides: Sequence[str]):
    """conf/ composed with `overrides` onto train.py's schema (trainer.config.RunConfig), validated."""
    from trainer.preflight import choices_note, compose as compose_with_hydra, explain, run_config

    try:
        dcfg = compose_with_hydra(overrides)  # as train.py's job sees it (its hydra node names the choices)
        note = choices_note(overrides, dcfg)  # a curriculum choice the experiment overrides
        if note:
            print(f"launch.plan: warning: {note}", file=sys.stderr)
        return run_config(dcfg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - Hydra / OmegaConf / schema errors: one line, as train.py says them
        raise ConfigError(explain(e, overrides)) from None


def resolve_layout(par, gpus: Optional[int], cp: Optional[int] = None) -> Dict[str, int]:
    """Degrees with -1 filled by parallel/dims.py, as train.py fills them on `gpus` processes; `gpus` None =
    the smallest world the explicit degrees need."""
    cp = par.cp if cp is None else cp
    rep, shard, tp = par.dp_replicate, par.dp_shard, par.tp
    fixed = cp * tp * (rep if rep != -1 else 1) * (shard if shard != -1 else 1)
    world = gpus if gpus is not None else max(fixed, par.ep * tp if shard == -1 else fixed)
    try:
        dims = ParallelDims(replace(par, cp=cp), world_size=world)
    except ConfigError as e:
        raise ConfigError(f"--gpus {world} (WORLD_SIZE below): {e}") from None
    return dict(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, cp=dims.cp, tp=dims.tp, ep=dims.ep)


def make_setup(cfg, seq_len: int, micro_batch: int, gpus: Optional[int], gpu, weights: str, compiled: bool,
               model: Optional[JambaConfig] = None, cp: Optional[int] = None) -> Setup:
    """The Setup of one stage; gradient accumulation from train.global_batch_tokens (at least 1: a global batch
    smaller than one micro-batch per data-parallel rank is reported by `describe`, train.py rejects it)."""
    model = model or cfg.model
    lay = resolve_layout(cfg.parallel, gpus, cp)
    dp = lay["dp_replicate"] * lay["dp_shard"]
    accum = max(1, cfg.train.global_batch_tokens // (seq_len * micro_batch * dp))
    return Setup(model, seq_len=seq_len, micro_batch=micro_batch, sequence_parallel=cfg.parallel.sequence_parallel,
                 reshard_after_forward=cfg.parallel.reshard_after_forward is not False,
                 reduce_bf16=cfg.parallel.reduce_dtype == "bfloat16", ep_padded=cfg.parallel.ep_exchange == "padded",
                 weights=weights, compiled=compiled, grad_accum=accum, gpu=gpu, **lay)


# ================================================================================================
# Reports
# ================================================================================================

def ac_label(m: JambaConfig) -> str:
    ac = "+".join(m.activation_checkpointing) or "none"
    return ac + (f", MoE chunks of {m.moe_token_chunk:,}" if m.moe_token_chunk else "")


def describe(s: Setup, mem: MemoryPlan, t: TimePlan, global_batch_tokens: Optional[int] = None,
             margin: float = 0.0) -> str:
    m = s.model
    top, layers = layer_param_counts(m)
    total = sum(d + e for d, e in layers) + top["embedding"] + top["lm_head"] + top["final_norm"]
    lines = [
        f"{s.seq_len:,} tokens x {s.micro_batch} on {s.world} x {s.gpu.name}: dp_replicate={s.dp_replicate} "
        f"dp_shard={s.dp_shard} cp={s.cp} tp={s.tp} ep={s.ep}; AC {ac_label(m)}; weights {s.weights}; "
        f"grad accumulation {s.grad_accum}; model "
        + (f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M") + " parameters",
        f"  peak memory per GPU: {mem.peak_gib:.1f} GiB of {usable_gib(s):.1f} usable -> "
        f"{'fits' if mem.fits(s, margin) else 'DOES NOT FIT'} with a {100 * margin:.0f}% margin (peak at {mem.where})",
        "    " + ", ".join(f"{k} {v:.1f}" for k, v in mem.parts.items() if abs(v) >= 0.05),
        f"  tokens/s: {t.tokens_per_s:,.0f} ({t.tokens_per_s_per_gpu:,.0f} per GPU), MFU {100 * t.mfu:.1f}%, "
        f"step {t.step_s:.2f} s per micro-batch, communication {100 * t.comm_share:.0f}% of it",
        "    " + ", ".join(f"{k} {v:.3f} s" for k, v in t.parts.items() if v >= 5e-4),
    ]
    lines = [line for line in lines if line.strip()]
    per_step = s.dp * s.micro_batch * s.seq_len
    if global_batch_tokens and global_batch_tokens < per_step:
        lines.append(f"  note: train.global_batch_tokens={global_batch_tokens:,} is less than one micro-batch per "
                     f"data-parallel rank ({s.dp} x {s.micro_batch} x {s.seq_len:,} = {per_step:,}); train.py "
                     "rejects that: raise it, or use fewer data-parallel ranks (more cp, tp or fewer GPUs)")
    if s.grad_accum > 1 and s.fsdp:
        lines.append("  note: with gradient accumulation FSDP2 keeps unsharded fp32 gradients between micro-batches "
                     "(counted above)")
    return "\n".join(lines)


def ac_options(m: JambaConfig) -> List[JambaConfig]:
    """No AC, as configured, AC on every layer, AC on every layer with token-chunked MoE (distinct ones only)."""
    opts = [m.replace(activation_checkpointing=[], moe_token_chunk=None), m, m.replace(activation_checkpointing=["all"]),
            m.replace(activation_checkpointing=["all"], moe_token_chunk=m.moe_token_chunk or DEFAULT_CHUNK)]
    seen, out = set(), []
    for o in opts:
        key = (tuple(o.activation_checkpointing), o.moe_token_chunk)
        if key not in seen:
            seen.add(key)
            out.append(o)
    return out


def search(cfg, seq_len: int, micro_batch: int, gpus: Optional[int], gpu, weights: str, compiled: bool,
           margin: float = 0.0, max_cp: int = 64) -> Tuple[List[Tuple[Setup, MemoryPlan, TimePlan]], Optional[Tuple]]:
    """Every (cp, AC option) that is a valid layout; the best = smallest cp that fits, fastest there."""
    tried, best = [], None
    cp = 1
    while cp <= max_cp:
        for m in ac_options(cfg.model):
            try:
                s = make_setup(cfg, seq_len, micro_batch, gpus, gpu, weights, compiled, model=m, cp=cp)
            except ConfigError:
                continue
            mem, t = _plan_memory(s), _plan_time(s)
            tried.append((s, mem, t))
            if mem.fits(s, margin) and (best is None or (best[0].cp == cp and t.tokens_per_s > best[2].tokens_per_s)):
                best = (s, mem, t)
        if best is not None:
            break
        cp *= 2
    return tried, best


POSITIVE_ARGS = {"seq": "a sequence length in tokens", "micro_batch": "sequences per micro-batch",
                 "gpus": "the world size", "gpus_per_node": "GPUs per node", "gpu_mem": "GiB per GPU",
                 "matmul_tflops": "bf16 TFLOP/s", "link_gbs": "GB/s per GPU", "inter_node_gbs": "GB/s per GPU"}


def check_args(args: argparse.Namespace) -> None:
    """One ConfigError line for a value that is not a plan's: a 0 would otherwise read as 'not given' (the
    stage's default) and a --margin of 1 or more leaves no memory to fit in."""
    for key, what in POSITIVE_ARGS.items():
        value = getattr(args, key)
        if value is not None and not value > 0:  # `not >` also refuses nan
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {value} must be positive ({what}); leave {flag} out for the default")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin {args.margin} must be in [0, 1): the fraction of the usable memory a plan "
                          "leaves free (default 0.05)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (e.g. experiment=bench_3b)")
    ap.add_argument("--seq", type=int, help="sequence length (default: every curriculum stage with --search, "
                                            "else the longest stage)")
    ap.add_argument("--micro-batch", type=int, help="micro-batch (default: the stage's)")
    ap.add_argument("--gpus", type=int, help="world size (default: what the parallel degrees need)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--gpu-mem", type=float, help="GiB per GPU (torch's total_memory), overriding --gpu's")
    ap.add_argument("--matmul-tflops", type=float, help="measured bf16 matmul ceiling, overriding --gpu's")
    ap.add_argument("--link-gbs", type=float, help="intra-node bus bandwidth per GPU, GB/s (default 350)")
    ap.add_argument("--inter-node-gbs", type=float, help="inter-node bandwidth per GPU, GB/s (default 45)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8): groups beyond it use --inter-node-gbs")
    ap.add_argument("--weights", choices=("fp32-master", "bf16"), default="fp32-master",
                    help="fp32-master: train.py; bf16: launch.bench (bf16 weights and AdamW states)")
    ap.add_argument("--eager", action="store_true", help="train.compile=false (more saved activations)")
    ap.add_argument("--search", action="store_true", help="smallest cp (and AC setting) at which it fits")
    ap.add_argument("--margin", type=float, default=0.05,
                    help="fraction of the usable memory a plan must leave free to count as fitting (default 0.05: "
                         "the model is validated on one GPU only; its terms for several GPUs are not measured yet)")
    ap.add_argument("--calibrate", action="store_true", help="refit the constants to the measured points")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_intermixed_args(argv)
    check_args(args)

    if args.calibrate:
        points = load_points()
        print("with the current constants:")
        print_point_table(point_errors(points))
        fit = calibrate(points)
        print(f"\nrefitted: {fit}   (current: saved_scale={plan_memory.SAVED_SCALE}, temp_scale="
              f"{plan_memory.TEMP_SCALE}, fixed_gib={plan_memory.FIXED_GIB}, step_overhead={plan_time.STEP_OVERHEAD})")
        print_point_table(point_errors(points, **fit))
        return 0

    cfg = compose(args.overrides)
    gpu = GPUS[args.gpu]
    changes = {k: v for k, v in (("mem_gib", args.gpu_mem), ("matmul_tflops", args.matmul_tflops),
                                 ("link_gbs", args.link_gbs), ("inter_node_gbs", args.inter_node_gbs),
                                 ("gpus_per_node", args.gpus_per_node)) if v is not None}
    gpu = replace(gpu, **changes)
    compiled = not args.eager and cfg.train.compile is not False
    stages = [(st.seq_len, st.micro_batch_size) for st in cfg.curriculum.stages]
    if args.seq is not None:
        stages = [(args.seq, args.micro_batch or 1)]
    elif not args.search:
        stages = [max(stages)]
    if args.micro_batch is not None:
        stages = [(sq, args.micro_batch) for sq, _ in stages]

    results = []
    for seq, mb in stages:
        if args.search:
            tried, best = search(cfg, seq, mb, args.gpus, gpu, args.weights, compiled, args.margin)
            if not args.json:
                print(f"== stage {human_tokens(seq)} x {mb}: tried (cp, AC) ->")
                for s, mem, t in tried:
                    print(f"   cp={s.cp:<3} AC {ac_label(s.model):<38} {mem.peak_gib:7.1f} GiB "
                          f"{'fits' if mem.fits(s, args.margin) else 'no  '}  {t.tokens_per_s_per_gpu:9,.0f} tokens/s/GPU")
                if best:
                    print(f"   smallest cp that fits: cp={best[0].cp} with AC {ac_label(best[0].model)}")
                    print(describe(*best, cfg.train.global_batch_tokens, args.margin))
                else:
                    print("   nothing tried fits: add GPUs (--gpus), tp or ep, or a shorter sequence")
            results.append({"seq": seq, "micro_batch": mb, "fits": best is not None,
                            **({"cp": best[0].cp, "ac": best[0].model.activation_checkpointing,
                                "moe_token_chunk": best[0].model.moe_token_chunk,
                                "peak_gib": best[1].peak_gib, "tokens_per_s": best[2].tokens_per_s}
                               if best else {})})
        else:
            s = make_setup(cfg, seq, mb, args.gpus, gpu, args.weights, compiled)
            mem, t = _plan_memory(s), _plan_time(s)
            if not args.json:
                print(describe(s, mem, t, cfg.train.global_batch_tokens, args.margin))
            results.append({"seq": seq, "micro_batch": mb, "cp": s.cp, "fits": mem.fits(s, args.margin),
                            "peak_gib": mem.peak_gib, "where": mem.where, "memory_gib": mem.parts,
                            "tokens_per_s": t.tokens_per_s, "tokens_per_s_per_gpu": t.tokens_per_s_per_gpu,
                            "mfu": t.mfu, "time_s": t.parts})
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"launch.plan: {e}", file=sys.stderr)
        sys.exit(2)
