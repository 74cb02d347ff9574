"""Multi-GPU scaling of train.py: tokens/s per GPU on 1 and N GPUs per parallel layout, read from metrics.jsonl.

    python -m launch.scale          # bench-3b, 4096 x 4 per data-parallel rank: 1 GPU, then fsdp, ep (sized, padded,
                                    # overlapped exchange), tp, hsdp on 2
    python -m launch.scale --layouts single,fsdp,ep --compile --json scale.json --md scale.md
    python -m launch.scale --layouts single,fsdp,ep --compile --repeat 3   # medians of 3 interleaved rounds
    python -m launch.scale --device cpu --preset tiny --seq 64 --micro-batch 2 --steps 4 --warmup 2 --log-every 2 \
        --ceiling-size 0 --comm-profile none      # CPU smoke run (gloo)

Every configuration is its own `torchrun --standalone --nproc_per_node N train.py ...` with the same model,
sequence length and micro-batch per data-parallel rank (global batch = seq x micro-batch x dp size, so no
gradient accumulation), `--steps` optimizer steps at a constant `--lr` (3e-5, a real run's early rate), no
validation and no checkpoint. bench-3b's MoE routing collapses from initialisation within about 12 steps (at
3e-5 as with a fast warm-up to 6e-4: one EP rank gets nearly every token of some layer), so an EP figure is
measured at that balance: the EP rank load column says which (`--set model.moe_force_balance=true` routes
round-robin instead, for EP at balanced routing; benchmarking only). tokens/s comes from the
run's metrics.jsonl: the trainer logs every `--log-every` steps the tokens/s since its previous record, so the
records after `--warmup` steps (compilation, allocator warm-up, the loader's first fill) are combined into
total tokens / total time of the timed steps, with no extra host sync per step.

Reported per configuration: tokens/s of the whole job and per GPU, scaling efficiency (per-GPU tokens/s over the
1-GPU run's), MFU (model FLOPs per token from `jamba.flops.flops_per_token` x per-GPU tokens/s, over a bf16 matmul
ceiling measured on this machine as `launch.bench` does), peak memory, and for the layouts in `--comm-profile`
(default tp) the share of a training step's GPU time spent in NCCL kernels, from torch.profiler
(`launch/comm_profile.py`, a separate torchrun of a few steps on random tokens). Output: a markdown table on
stdout (and `--md`), everything in `--json`, and a line comparing every other multi-GPU layout with fsdp.
On 2 H200s the same layout has differed by several percent between leases (EP: 91.1% and 95.3% of FSDP), so
`--repeat N` runs N interleaved rounds over the layouts and reports each layout's median run with the spread
of all of them (`runs` in the JSON holds every run).

Layouts on N GPUs (`--gpus`, default 2): single (1 GPU, the baseline), fsdp (dp_shard=N), ep (ep=2 over
dp_shard=N), ep_padded (the same with parallel.ep_exchange=padded: no host sync per MoE layer), ep_overlap
(parallel.ep_exchange=overlap: the all-to-alls under the experts' GEMMs), tp (tp=2, dp=N/2: each tensor-parallel pair processes one micro-batch, so per-GPU tokens/s is
half the pair's), hsdp (dp_replicate=2 x dp_shard=N/2). `--variant NAME=BASE;OVERRIDE;...` adds a layout
for an A/B in the same rounds: BASE's overrides plus train.py overrides and `env:VAR=value` environment
variables, e.g. `--variant "fsdp_root_head=fsdp;parallel.fsdp_lm_head_unit=false"` or
`--variant "fsdp_ctas8=fsdp;env:NCCL_MAX_CTAS=8"`; list NAME in --layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from trainer.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_NAMES = ("single", "fsdp", "ep", "ep_padded", "ep_overlap", "tp", "hsdp")


@dataclass(frozen=True)
class Layout:
    name: str
    gpus: int
    overrides: tuple
    dp: int  # data-parallel size: micro-batches processed per step
    env: tuple = ()  # (VAR, value) pairs set for this layout's runs (--variant env:VAR=value)


def parse_variant(spec: str) -> tuple:
    """'NAME=BASE;OVERRIDE;env:VAR=value;...' -> (NAME, BASE, overrides, env pairs)."""
    head, _, rest = spec.partition(";")
    name, eq, base = head.partition("=")
    if not eq or not name.strip() or not base.strip():
        raise ValueError(f"--variant {spec!r}: write NAME=BASE;OVERRIDE;..., e.g. "
                         f"'fsdp_root_head=fsdp;parallel.fsdp_lm_head_unit=false'")
    overrides, env = [], []
    for item in (x.strip() for x in rest.split(";")):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"--variant {spec!r}: {item!r} is neither KEY=VALUE nor env:VAR=value")
        if item.startswith("env:"):
            env.append(tuple(item[4:].split("=", 1)))
        else:
            overrides.append(item)
    name, base = name.strip(), base.strip()
    if name in LAYOUT_NAMES:
        raise ValueError(f"--variant {spec!r}: {name!r} is a built-in layout; give the variant its own name")
    return name, base, tuple(overrides), tuple(env)


def layout(name: str, gpus: int, variants: Optional[Dict[str, tuple]] = None) -> Layout:
    """The parallel overrides of a named layout on `gpus` GPUs (single always runs on one); `variants`
    (name -> parse_variant's tuple) extend a built-in layout."""
    if variants and name in variants:
        _, base, overrides, env = variants[name]
        if base not in LAYOUT_NAMES:
            raise ValueError(f"--variant {name}={base}: unknown base layout {base!r}; choose from "
                             f"{', '.join(LAYOUT_NAMES)}")
        b = layout(base, gpus)
        return Layout(name, b.gpus, b.overrides + overrides, b.dp, b.env + env)
    if name == "single":
        return Layout("single", 1, ("parallel=single",), 1)
    if gpus < 2 or gpus % 2:
        raise ValueError(f"--gpus={gpus}: the multi-GPU layouts need an even number of GPUs >= 2")
    table = {
        "fsdp": (("parallel=fsdp",), gpus),
        "ep": (("parallel=ep", "parallel.ep=2"), gpus),
        "ep_padded": (("parallel=ep", "parallel.ep=2", "parallel.ep_exchange=padded"), gpus),  # no host sync
        "ep_overlap": (("parallel=ep", "parallel.ep=2", "parallel.ep_exchange=overlap"), gpus),  # a2a under GEMMs
        "tp": (("parallel=tp", "parallel.tp=2"), gpus // 2),
        "hsdp": (("parallel=hsdp", "parallel.dp_replicate=2", f"parallel.dp_shard={gpus // 2}"), gpus),
    }
    if name not in table:
        raise ValueError(f"--layouts: unknown layout {name!r}; choose from {', '.join(LAYOUT_NAMES)} "
                         f"or define it with --variant")
    overrides, dp = table[name]
    return Layout(name, gpus, overrides, dp)


@dataclass
class Result:
    layout: str
    gpus: int
    status: str = "not run"
    tokens_per_s: Optional[float] = None
    tokens_per_s_per_gpu: Optional[float] = None
    median_window_per_gpu: Optional[float] = None  # the median logging window's tokens/s per GPU
    efficiency: Optional[float] = None
    mfu: Optional[float] = None
    timed_steps: int = 0
    step_ms: Optional[float] = None
    peak_gib: Optional[float] = None
    loss_last: Optional[float] = None
    moe_rank_load_max: Optional[float] = None  # worst over the timed records (EP only)
    wall_s: Optional[float] = None
    comm: Optional[dict] = None
    run_dir: str = ""
    error: str = ""
    command: List[str] = field(default_factory=list)
    env: List[str] = field(default_factory=list)  # a --variant's env:VAR=value settings, as VAR=value
    runs_per_gpu: List[float] = field(default_factory=list)  # --repeat: every ok run's tokens/s per GPU, sorted
    runs_failed: int = 0  # --repeat: runs of this layout that did not finish (listed in the JSON's "runs")


# ---- metrics.jsonl -> throughput ------------------------------------------------------------------
def weighted_median(pairs: Sequence[Tuple[float, float]]) -> float:
    """The median of (value, weight) pairs: the value below and above which half the weight lies (the mean of
    the two middle values when the halves split exactly between them, as statistics.median for equal weights).
    Windows are weighted by their tokens, so a short last window (--steps not a multiple of the logging
    interval) counts for its length, not as much as a full one."""
    pairs = sorted(pairs)
    half, acc = sum(w for _, w in pairs) / 2, 0.0
    if not half > 0:
        raise ValueError(f"weighted_median needs a positive total weight: {pairs}")
    for i, (v, w) in enumerate(pairs):
        acc += w
        if acc > half:
            return v
        if acc == half:
            return (v + pairs[i + 1][0]) / 2
    raise AssertionError("unreachable: the weights add up to more than half")


def timed_throughput(records: Sequence[dict], warmup: int) -> dict:
    """Combine the training records after `warmup` steps into one rate.

    A record at step s with tokens T and tokens_per_s R covers the steps since the previous record (tokens
    T - T_prev over (T - T_prev) / R seconds), so the timed rate is the sum of tokens over the sum of times.
    Windows that start before step `warmup` are left out. Also the median of the windows' rates, weighted by
    their tokens: a stall (on 2 H200s one logging window in 6 to 16 ran 17-31% slower, in every layout; the one
    checked was a 407 ms full garbage collection, see train.gc_freeze) moves the mean by several percent
    depending on whether it falls inside the timed steps; the median does not see it."""
    train = sorted((r for r in records if "loss" in r and "tokens_per_s" in r), key=lambda r: r["step"])
    prev_tokens, prev_step = 0, 0  # a fresh run (checkpoint.resume=false): the meter starts at step 0
    tokens, secs, steps, rates = 0, 0.0, 0, []
    for r in train:
        window = r["tokens"] - prev_tokens
        if prev_step >= warmup and window > 0 and (r["tokens_per_s"] or 0) > 0:
            tokens += window
            secs += window / r["tokens_per_s"]
            steps += r["step"] - prev_step
            rates.append((r["tokens_per_s"], window))
        prev_tokens, prev_step = r["tokens"], r["step"]
    if not steps:
        raise ValueError(f"no training record after the {warmup} warm-up steps (steps logged: "
                         f"{[r['step'] for r in train]}); raise --steps or lower --warmup / --log-every")
    loads = [r["moe_rank_load_max"] for r in train if r["step"] > warmup and "moe_rank_load_max" in r]
    return {"tokens_per_s": tokens / secs, "median_window_tokens_per_s": weighted_median(rates),
            "timed_steps": steps, "step_ms": 1e3 * secs / steps,
            "peak_gib": max((r.get("mem_gb") or 0.0) for r in train) or None, "loss_last": train[-1]["loss"],
            "moe_rank_load_max": max(loads) if loads else None}


def fill(res: Result, tp: dict, lay: Layout, flops_per_token: Optional[float], ceiling: Optional[float]) -> None:
    """Per-GPU rate and MFU against the measured ceiling (the efficiency against one GPU is `aggregate`'s)."""
    res.tokens_per_s = tp["tokens_per_s"]
    res.tokens_per_s_per_gpu = tp["tokens_per_s"] / lay.gpus
    res.median_window_per_gpu = tp["median_window_tokens_per_s"] / lay.gpus
    res.timed_steps, res.step_ms, res.peak_gib, res.loss_last = (tp["timed_steps"], tp["step_ms"], tp["peak_gib"],
                                                                 tp["loss_last"])
    res.moe_rank_load_max = tp.get("moe_rank_load_max")
    if flops_per_token and ceiling:
        res.mfu = flops_per_token * res.tokens_per_s_per_gpu / (ceiling * 1e12)
    res.status = "ok"


def aggregate(runs: Sequence[Result]) -> List[Result]:
    """One row per layout (in first-run order) from all its runs (--repeat): the median run by tokens/s per
    GPU (the lower of the two middle ones for an even count; its MFU is its own), all runs' per-GPU rates
    kept sorted in `runs_per_gpu`, the NCCL profile of whichever run had one (the first round's), and the
    efficiency against the median single-GPU rate ("single", or the only 1-GPU layout). A layout none of whose runs succeeded keeps its first
    failure."""
    by_name: Dict[str, List[Result]] = {}
    for r in runs:
        by_name.setdefault(r.layout, []).append(r)
    rows = []
    for name, rs in by_name.items():
        ok = sorted((r for r in rs if r.status == "ok"), key=lambda r: r.tokens_per_s_per_gpu)
        row = replace(ok[(len(ok) - 1) // 2] if ok else rs[0])
        row.runs_per_gpu = [r.tokens_per_s_per_gpu for r in ok]
        row.runs_failed = len(rs) - len(ok)
        row.comm = next((r.comm for r in rs if r.comm), None)
        rows.append(row)
    singles = [r for r in rows if r.gpus == 1]
    # the baseline: "single", or else the one 1-GPU layout there is (a variant of single, e.g. with other
    # model settings that the multi-GPU variants share); with several and no "single", or a failed one, none
    base_row = next((r for r in singles if r.layout == "single"), singles[0] if len(singles) == 1 else None)
    base = base_row.tokens_per_s_per_gpu if (base_row and base_row.status == "ok") else None
    for r in rows:
        r.efficiency = r.tokens_per_s_per_gpu / base if (base and r.status == "ok") else None
    return rows


# ---- report ---------------------------------------------------------------------------------------
def _f(x, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if x is None else format(x * scale, spec) + unit


def markdown(results: Sequence[Result], meta: dict) -> str:
    lines = [f"{meta['preset']}, {meta['seq']} x {meta['micro_batch']} per data-parallel rank, "
             f"{'compiled' if meta['compile'] else 'eager'}, {meta['timed']} timed steps after {meta['warmup']} "
             f"warm-up; MFU against a measured {meta['dtype']} matmul ceiling of "
             f"{_f(meta['ceiling_tflops'], '.1f')} TFLOP/s ({meta.get('gpu') or meta['device']})", "",
             "| layout | GPUs | tokens/s | tokens/s per GPU | median window per GPU | vs 1 GPU | MFU | step ms | peak GiB "
             "| NCCL share of step | EP rank load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        comm = "-"
        if r.comm:
            kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in r.comm["nccl_ms_by_kind"].items())
            comm = f"{100 * r.comm['nccl_share_of_wall']:.1f}%" + (f" ({kinds})" if kinds else "")
            if "nccl_exposed_share_of_wall" in r.comm:  # CUDA: the part no computation hid
                comm += f"; not hidden {100 * r.comm['nccl_exposed_share_of_wall']:.1f}%"
            sr = r.comm.get("sendrecv_ms_per_step")
            if sr and len(set(sr["counts_by_rank"])) > 1:  # paired by position: only equal counts pair up
                comm += "; all-to-alls: ranks ran different numbers, not split"
            elif sr and sr["count"]:  # EP: the all-to-alls' time moving rows vs each rank waiting for the other
                comm += (f"; all-to-alls {sr['exchange']:.1f} ms moving rows, waits by rank "
                         + "/".join(f"{w:.1f}" for w in sr["wait_by_rank"]) + " ms")
        status = "" if r.status == "ok" else f" **{r.status}**"
        if len(r.runs_per_gpu) > 1:  # --repeat: the row is the median run; the spread of all of them
            status += (f" (median of {len(r.runs_per_gpu)} runs, per GPU {r.runs_per_gpu[0]:,.0f}-"
                       f"{r.runs_per_gpu[-1]:,.0f})")
        if r.runs_failed and r.status == "ok":
            status += f" **{r.runs_failed} more run(s) failed**"
        lines.append(f"| {r.layout}{status} | {r.gpus} | {_f(r.tokens_per_s, ',.0f')} | "
                     f"{_f(r.tokens_per_s_per_gpu, ',.0f')} | {_f(r.median_window_per_gpu, ',.0f')} | "
                     f"{_f(r.efficiency, '.1f', 100, '%')} | "
                     f"{_f(r.mfu, '.1f', 100, '%')} | {_f(r.step_ms, '.0f')} | {_f(r.peak_gib, '.1f')} | {comm} | "
                     f"{_f(r.moe_rank_load_max, '.2f')} |")
    fsdp = _fsdp_reference(results)
    others = [r for r in results if r.status == "ok" and r.gpus > 1 and r is not fsdp]
    if fsdp and others:  # the issue's EP goal is against FSDP on the same GPUs
        lines += ["", f"tokens/s per GPU against {fsdp.layout} (median windows in parentheses): " + ", ".join(
            f"{r.layout} {100 * r.tokens_per_s_per_gpu / fsdp.tokens_per_s_per_gpu:.1f}% "
            f"({100 * r.median_window_per_gpu / fsdp.median_window_per_gpu:.1f}%)" for r in others)]
    return "\n".join(lines)


def _fsdp_reference(results: Sequence[Result]) -> Optional[Result]:
    """The row the multi-GPU layouts are compared with: "fsdp" (none if it failed), or else the only variant of
    fsdp that ran (e.g. fsdp_b2 beside ep_b2, sharing a model setting)."""
    named = next((r for r in results if r.layout == "fsdp"), None)
    if named is not None:
        return named if named.status == "ok" else None
    variants = [r for r in results if r.status == "ok" and r.gpus > 1 and "parallel=fsdp" in r.command]
    return variants[0] if len(variants) == 1 else None


# ---- running ----------------------------------------------------------------------------------------
def train_overrides(args: argparse.Namespace, lay: Layout, run_dir: Path) -> List[str]:
    return [f"hydra.run.dir={run_dir}", f"model={args.preset}", *lay.overrides, f"train.device={args.device}",
            f"train.max_steps={args.steps}", f"train.global_batch_tokens={args.seq * args.micro_batch * lay.dp}",
            f"curriculum.stages=[{{seq_len: {args.seq}, micro_batch_size: {args.micro_batch}}}]",
            f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0",
            f"train.compile={str(args.compile).lower()}",
            "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false", "checkpoint.resume=false",
            f"logging.log_every={args.log_every}", "logging.progress_bar=false", "logging.wandb.mode=disabled",
            *args.set]


def torchrun(nproc: int, *rest: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *rest]


def run_logged(cmd: List[str], log: Path, timeout: float, env: dict) -> tuple:
    """Run in its own session (so a timeout kills the workers and their loader processes too)."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump_stacks(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.monotonic() - t0


def dump_stacks(agent_pid: int) -> None:
    """A run past --timeout (a stall): SIGABRT to torchrun's workers, one at a time, so that faulthandler
    (PYTHONFAULTHANDLER=1 in their environment) writes each rank's Python stack into the log."""
    try:
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    except OSError:
        return
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGABRT)
        except OSError:
            pass
        time.sleep(2)


def measure_ceiling(args: argparse.Namespace, env: dict) -> Optional[float]:
    """bf16 matmul TFLOP/s on this machine's first device, in a subprocess (the driver keeps no CUDA context)."""
    if not args.ceiling_size:
        return None
    code = ("import json, torch; from launch.bench import DTYPES, matmul_ceiling; "
            f"print(json.dumps(matmul_ceiling(torch.device({args.device!r}), {args.ceiling_size}, "
            f"DTYPES[{args.dtype!r}])))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode:
        print(f"matmul ceiling: failed ({out.stderr.strip()[-500:]}); no MFU", flush=True)
        return None
    return float(out.stdout.strip().splitlines()[-1])


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def run_all(args: argparse.Namespace) -> dict:
    from jamba.config import get_preset
    from jamba.flops import flops_per_token

    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", PYTHONFAULTHANDLER="1")
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fpt = flops_per_token(get_preset(args.preset), args.seq)
    ceiling = measure_ceiling(args, env)
    print(f"matmul ceiling: {_f(ceiling, '.1f')} TFLOP/s; model FLOPs per token {fpt:.4g}", flush=True)
    meta = {"preset": args.preset, "seq": args.seq, "micro_batch": args.micro_batch, "compile": args.compile,
            "warmup": args.warmup, "timed": args.steps - args.warmup, "dtype": args.dtype, "device": args.device,
            "ceiling_tflops": ceiling, "flops_per_token": fpt, "gpus": args.gpus, "set": args.set,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        from launch.bench import environment
        meta.update(environment())
    except Exception as e:  # noqa: BLE001 - informational only
        meta["environment_error"] = str(e)
    report = {"meta": meta, "results": [], "runs": []}
    runs: List[Result] = []
    for rnd in range(args.repeat):
        for name in args.layouts:
            lay = layout(name, args.gpus, args.variants)
            run_dir = out_dir / (name if rnd == 0 else f"{name}.r{rnd + 1}")
            lay_env = dict(env, **dict(lay.env))
            res = run_layout(args, lay, run_dir, lay_env, fpt, ceiling)
            if rnd == 0 and name in args.comm_profile and res.status == "ok":
                res.comm = comm_profile(args, lay, run_dir, lay_env)
            runs.append(res)
            results = aggregate(runs)
            report["results"] = [asdict(r) for r in results]
            report["runs"] = [asdict(r) for r in runs]
            save(args, report, results, meta)
    return report


def run_layout(args: argparse.Namespace, lay: Layout, run_dir: Path, env: dict, fpt: Optional[float],
               ceiling: Optional[float]) -> Result:
    """One torchrun of train.py for a layout; its rate from metrics.jsonl (efficiency: see `aggregate`)."""
    name = lay.name
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own output: a fresh metrics.jsonl
    run_dir.mkdir(parents=True)
    cmd = torchrun(lay.gpus, "train.py", *train_overrides(args, lay, run_dir))
    res = Result(name, lay.gpus, run_dir=str(run_dir), command=cmd, env=[f"{k}={v}" for k, v in lay.env])
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    code, res.wall_s = run_logged(cmd, run_dir / "torchrun.log", args.timeout, env)
    if code != 0:
        res.status = "timeout" if code is None else f"exit {code}"
        res.error = tail(run_dir / "torchrun.log")
        print(f"[{name}] {res.status} after {res.wall_s:.0f} s; log {run_dir / 'torchrun.log'}:\n"
              f"{res.error[-1500:]}", flush=True)
        return res
    try:
        fill(res, timed_throughput(read_jsonl(run_dir / "metrics.jsonl", torn_anywhere=True), args.warmup), lay, fpt, ceiling)
    except ValueError as e:
        res.status, res.error = "no timed steps", str(e)
    print(f"[{name}] {res.status}: {_f(res.tokens_per_s, ',.0f')} tokens/s, "
          f"{_f(res.tokens_per_s_per_gpu, ',.0f')} per GPU, MFU {_f(res.mfu, '.1f', 100, '%')} "
          f"({res.wall_s:.0f} s)", flush=True)
    return res


def comm_profile(args: argparse.Namespace, lay: Layout, run_dir: Path, env: dict) -> Optional[dict]:
    """NCCL kernel time in a few profiled training steps of this layout (launch/comm_profile.py)."""
    out = run_dir / "comm_profile.json"
    cmd = torchrun(lay.gpus, "-m", "launch.comm_profile", f"--out={out}", f"--warmup={args.profile_warmup}",
                   f"--steps={args.profile_steps}", "--",
                   *[o for o in train_overrides(args, lay, run_dir) if not o.startswith("hydra.")])
    print(f"[{lay.name}] comm profile: {' '.join(cmd[2:])}", flush=True)
    code, wall = run_logged(cmd, run_dir / "comm_profile.log", args.timeout, env)
    if code != 0 or not out.is_file():
        print(f"[{lay.name}] comm profile failed ({'timeout' if code is None else code}):\n"
              f"{tail(run_dir / 'comm_profile.log', 1500)}", flush=True)
        return None
    prof = json.loads(out.read_text())
    print(f"[{lay.name}] NCCL {100 * prof['nccl_share_of_wall']:.1f}% of the step's wall time "
          f"({prof['nccl_ms_per_step']:.1f} of {prof['wall_ms_per_step']:.1f} ms; {wall:.0f} s)", flush=True)
    return prof


def save(args: argparse.Namespace, report: dict, results: Sequence[Result], meta: dict) -> None:
    table = markdown(results, meta)
    report["markdown"] = table
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUT_NAMES),
                   help=f"comma-separated, run in this order (default {','.join(LAYOUT_NAMES)}); "
                        "single (anywhere in the list; else the only 1-GPU layout) is the baseline of the efficiency column")
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU layouts (default 2)")
    p.add_argument("--preset", default="bench-3b", help="model preset, a conf/model/ name (default bench-3b)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per data-parallel rank per step (default 4)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the rate (default 4)")
    p.add_argument("--log-every", type=int, default=4,
                   help="trainer's logging.log_every; must divide --warmup and --steps (default 4)")
    p.add_argument("--compile", action="store_true",
                   help="train.compile=true (the first steps compile: raise --warmup)")
    p.add_argument("--comm-profile", default="tp",
                   help="layouts whose NCCL share is profiled in an extra short run ('none' to skip; default tp)")
    p.add_argument("--lr", type=float, default=3e-5,
                   help="constant learning rate (default 3e-5: experiment=bench_3b's 6e-4 ten steps into its 200-step "
                        "warm-up, as a real run's first steps). bench-3b's routing collapses onto one EP rank within "
                        "about 12 steps at this rate too; the EP rank load column shows the balance each figure was "
                        "measured at")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-warmup", type=int, default=None,
                   help="steps before a comm profile's profiled ones (default: --warmup, so the profile sees the "
                        "routing the timed steps saw; expert biases move at every step)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=BASE;OVERRIDE;...",
                   help="an extra layout: a built-in one plus train.py overrides and env:VAR=value settings, "
                        "separated by ';' (list NAME in --layouts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for every run, e.g. --set data.num_workers=2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", help="dtype of the ceiling matmul (default bf16)")
    p.add_argument("--ceiling-size", type=int, default=None,
                   help="n of the n^3 ceiling matmul (default 8192 on CUDA, 0 = skip elsewhere)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over all layouts (interleaved: single, fsdp, ..., single, fsdp, ...); each row is "
                        "its layout's median run, with the spread (default 1)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds per torchrun; past it the workers' Python stacks go to its log, then it is killed")
    p.add_argument("--out-dir", default="runs/scale", help="run directories, one per layout (replaced)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun commands, run nothing")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    args.comm_profile = [] if args.comm_profile in ("", "none") else [s.strip() for s in args.comm_profile.split(",")]
    if args.ceiling_size is None:
        args.ceiling_size = 8192 if args.device == "cuda" else 0
    if args.profile_warmup is None:
        args.profile_warmup = args.warmup
    try:
        parsed = [parse_variant(v) for v in args.variant]
        args.variants = {v[0]: v for v in parsed}
        if len(args.variants) < len(parsed):
            raise ValueError(f"--variant: a name is defined twice ({[v[0] for v in parsed]})")
        unused = [n for n in args.variants if n not in args.layouts]
        if unused:
            raise ValueError(f"--variant {unused[0]} is not in --layouts {','.join(args.layouts)}: add it there")
        for name in args.layouts + args.comm_profile:
            layout(name, args.gpus, args.variants)
    except ValueError as e:
        p.error(str(e))
    if args.repeat < 1:
        p.error(f"--repeat={args.repeat}: give 1 or more rounds")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup={args.warmup} must be in [0, --steps={args.steps})")
    if args.log_every < 1 or args.warmup % args.log_every or args.steps % args.log_every:
        p.error(f"--log-every={args.log_every} must divide --warmup={args.warmup} and --steps={args.steps} "
                f"(the rate is read from the records at multiples of it)")
    return args


def dry_run(args: argparse.Namespace) -> dict:
    cmds = []
    for name in args.layouts:
        lay = layout(name, args.gpus, args.variants)
        cmds.append(torchrun(lay.gpus, "train.py", *train_overrides(args, lay, Path(args.out_dir) / name)))
        # pastes into a shell as it is (from the repository root: train.py is relative)
        print(" ".join([f"{k}={shlex.quote(str(v))}" for k, v in lay.env] + [shlex.join(cmds[-1])]))
    return {"meta": {}, "results": [], "commands": cmds}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    report = run_all(args)
    print("\n" + report.get("markdown", markdown([], report["meta"])))
    if not all(r["status"] == "ok" for r in report["results"]):
        print("some configurations failed: see their torchrun.log", file=sys.stderr)
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(0 if "commands" in rep or (rep["results"] and all(r["status"] == "ok" for r in rep["results"])) else 1)
