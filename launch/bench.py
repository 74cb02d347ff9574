"""Training-throughput benchmark: our JambaForCausalLM against transformers' on one GPU, same weights.

For a model preset and a list of (sequence length x micro-batch) points, each implementation runs
`--warmup` untimed and `--steps` timed training steps (forward, backward, fused AdamW step) on random
token ids, in one process and one after the other (a model and its optimizer are freed before the next
is built). transformers' `JambaForCausalLM` (`--hf`) is built by `jamba.hf.to_hf` from our freshly
initialised model, so both train the same weights on the same batch: their first losses must agree.

    python -m launch.bench --preset bench-3b --points 4096x4,16384x1,65536x1@all --hf --compile --json bench.json
    python -m launch.bench --preset bench-3b --find-max-seq --ac all --hf
    python -m launch.bench --preset bench-3b --points 4096x4 --profile
    python launch/bench.py --device cpu --preset tiny --points 64x2 --steps 1 --hf     # CPU smoke run

A point is `SEQxBATCH`, optionally `@AC` with AC one of none, all, or kinds joined by '+'
(mamba, attention, mlp, moe) to override `--ac` for that point, e.g. `65536x1@all`. For HF any
activation checkpointing means `gradient_checkpointing_enable()` (HF checkpoints every layer).

Columns: tokens/s over the timed steps; model TFLOP/s = tokens/s x `jamba.flops.flops_per_token`
(training FLOPs of the model, recomputation not counted); MFU against a bf16 matmul ceiling MEASURED in
the same run (an 8192^3 matmul by default); peak allocated memory; ours/HF tokens/s ratio.

`--find-max-seq`: for each implementation, the longest batch-1 sequence of `--max-seq-list` that trains
one full step without running out of memory (stops at the first OOM; memory is freed between tries).
`--compile`: our decoder layers and loss chunks through torch.compile, as `train.compile` does on CUDA.
`--profile`: one extra step under torch.profiler per implementation; prints the top kernels by device
time, a breakdown by kernel family, the operators that launched them, and the GPU timeline of the step
(busy vs idle time and the longest idle gaps, from the Chrome trace).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # `python launch/bench.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from jamba.config import CHECKPOINT_KINDS, ConfigError, JambaConfig, get_preset

log = logging.getLogger("launch.bench")

OOM_ERRORS: Tuple[type, ...] = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                                      torch.cuda.OutOfMemoryError})
DEFAULT_MAX_SEQ_LIST = "32768,65536,131072,196608,262144,393216,524288,786432,1048576"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
IMPLS = ("ours", "hf")


# ================================================================================================
# Points and activation checkpointing
# ================================================================================================

@dataclass(frozen=True)
class Point:
    seq_len: int
    micro_batch: int
    ac: Tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    def label(self) -> str:
        return f"{self.seq_len}x{self.micro_batch}"


def parse_ac(spec: str, where: str = "--ac") -> Tuple[str, ...]:
    """'none' / '' -> (); 'all' -> ('all',); 'mamba+moe' or 'mamba,moe' -> ('mamba', 'moe')."""
    spec = spec.strip().lower()
    if spec in ("", "none", "off", "no"):
        return ()
    kinds = tuple(k for k in re.split(r"[+,]", spec) if k)
    allowed = CHECKPOINT_KINDS + ("all",)
    bad = [k for k in kinds if k not in allowed]
    if bad:
        raise ValueError(f"{where}={spec!r}: unknown activation-checkpointing kinds {bad}; "
                         f"use none, all, or kinds joined by '+' from {list(CHECKPOINT_KINDS)}")
    return ("all",) if "all" in kinds else kinds


def parse_points(spec: str, default_ac: Tuple[str, ...] = ()) -> List[Point]:
    """'4096x4,16384x1,65536x1@all' -> [Point(4096, 4), Point(16384, 1), Point(65536, 1, ('all',))]."""
    points = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)(?:@([\w+]+))?", item)
        if not m or int(m.group(1)) < 2 or int(m.group(2)) < 1:
            raise ValueError(f"--points item {item!r} must look like SEQxBATCH or SEQxBATCH@AC "
                             f"(e.g. 4096x4 or 65536x1@all), with SEQ >= 2 and BATCH >= 1")
        ac = parse_ac(m.group(3), f"--points {item}") if m.group(3) else default_ac
        points.append(Point(int(m.group(1)), int(m.group(2)), ac))
    if not points:
        raise ValueError(f"--points={spec!r} names no point; e.g. --points 4096x4,16384x1")
    return points


def ac_label(ac: Sequence[str]) -> str:
    return "+".join(ac) if ac else "none"


# ================================================================================================
# Timing helpers
# ================================================================================================

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step wall time: CUDA events on GPU (no host sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> List[float]:
        sync(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def matmul_ceiling(device: torch.device, n: int, dtype: torch.dtype, iters: int = 20, repeats: int = 5) -> float:
    """Measured dense matmul rate in TFLOP/s: an n^3 product on random data, median of `repeats` runs."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeats):
        timer = StepTimer(device)
        timer.mark()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        timer.mark()
        rates.append(2 * n ** 3 * iters / timer.step_seconds()[0] / 1e12)
    del a, b, c
    return statistics.median(rates)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Tuple[Optional[float], Optional[float]]:
    if device.type != "cuda":
        return None, None
    return (torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30)


# ================================================================================================
# Models and their training step
# ================================================================================================

def build_ours(cfg: JambaConfig, device: torch.device, dtype: torch.dtype, seed: int):
    """Our model on `device` in `dtype`: built on meta, materialised there, initialised by init_weights."""
    from jamba.model import JambaForCausalLM

    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model.to(dtype).train()


def build_hf(cfg: JambaConfig, device: torch.device, dtype: torch.dtype, seed: int, ac: Sequence[str],
             attn_implementation: str, experts_implementation: Optional[str]):
    """transformers' JambaForCausalLM with the weights our model gets from the same seed (via jamba.hf.to_hf);
    our model is freed before this returns. Router logits on, so its loss includes the same aux loss as ours."""
    from jamba.hf import to_hf

    ours = build_ours(cfg, device, dtype, seed)
    hf = to_hf(ours, use_mamba_kernels=True, attn_implementation=attn_implementation,
               output_router_logits=True)
    del ours
    free_memory(device)
    if experts_implementation and hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation(experts_implementation)
    if ac:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    return hf.train()


def hf_paths(hf) -> Dict[str, object]:
    """Which implementation paths transformers' model takes (for the record)."""
    info: Dict[str, object] = {"attn_implementation": getattr(hf.config, "_attn_implementation", None),
                               "experts_implementation": getattr(hf.config, "_experts_implementation", None),
                               "gradient_checkpointing": bool(getattr(hf, "is_gradient_checkpointing", False))}
    try:
        import transformers.models.jamba.modeling_jamba as mj

        if hasattr(mj, "is_fast_path_available"):
            info["mamba_fast_path_available"] = bool(mj.is_fast_path_available)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def make_optimizer(model, device: torch.device, lr: float):
    """AdamW, fused on CUDA; weight decay on matrices only (our filter when the model has one)."""
    decay, no_decay = [], []
    base = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module
    filt = getattr(base, "weight_decay_filter", None)  # ours; transformers' model has none: decay matrices
    for name, p in base.named_parameters():
        if p.requires_grad:
            (decay if (filt(name, p) if callable(filt) else p.ndim >= 2) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kwargs)


def make_batches(vocab_size: int, point: Point, device: torch.device, n: int = 2, seed: int = 1234):
    """`n` random (input_ids, targets) batches; targets aligned (target of position t, -100 last): our
    `targets=` argument, the same targets as HF's `labels=input_ids`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (point.micro_batch, point.seq_len), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        batches.append((ids.to(device), labels.to(device)))
    return batches


def make_step(impl: str, model, opt, trainer_recipe: bool = False
              ) -> Callable[[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One training step: forward with loss, backward, optimizer step. Returns the detached loss (no sync).
    trainer_recipe: as train.py on one GPU: bf16 autocast over the (fp32) weights and gradient clipping at
    1.0 (trainer/loop.py's clip_grad_norm) before the step."""
    if impl == "ours":
        def forward(ids, labels):
            return model(ids, targets=labels).loss
    else:
        def forward(ids, labels):  # HF shifts its labels itself: pass the unshifted ids (same targets as ours)
            return model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True).loss

    if trainer_recipe:
        import contextlib

        from trainer.loop import clip_grad_norm

        params = [p for p in model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
               else contextlib.nullcontext())

    def step(batch):
        ids, labels = batch
        if trainer_recipe:
            with amp:
                loss = forward(ids, labels)
        else:
            loss = forward(ids, labels)
        loss.backward()
        if trainer_recipe:
            clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ================================================================================================
# Runs
# ================================================================================================

@dataclass
class Result:
    impl: str
    seq_len: int
    micro_batch: int
    ac: str
    status: str = "ok"  # ok | oom | error
    tokens_per_s: Optional[float] = None
    step_ms_median: Optional[float] = None
    step_ms_mean: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_alloc_gib: Optional[float] = None
    peak_reserved_gib: Optional[float] = None
    loss_first: Optional[float] = None
    losses: List[float] = field(default_factory=list)
    loss_last: Optional[float] = None
    error: Optional[str] = None
    info: Dict[str, object] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.ceiling: Optional[float] = None
        self.profiles: List[dict] = []
        self.step_options = {"trainer_recipe": True} if args.trainer_recipe else {}

    # ---- model lifecycle -----------------------------------------------------------------------
    def config(self, ac: Sequence[str]) -> JambaConfig:
        overrides = dict(self.args.override)
        overrides["activation_checkpointing"] = list(ac)
        return get_preset(self.args.preset, **overrides)

    def build(self, impl: str, ac: Sequence[str]):
        cfg = self.config(ac)
        torch.manual_seed(self.args.seed)
        if impl == "ours":
            model = build_ours(cfg, self.device, self.dtype, self.args.seed)
            if self.args.compile:
                from parallel.compile import apply_compile

                kw = {"mode": self.args.compile_mode} if self.args.compile_mode else {}
                apply_compile(model, **kw)  # per decoder layer, as train.compile=true does
            info = {}
        else:
            model = build_hf(cfg, self.device, self.dtype, self.args.seed, ac, self.args.hf_attn,
                             self.args.hf_experts)
            info = hf_paths(model)
        opt = make_optimizer(model, self.device, self.args.lr)
        return cfg, model, opt, info

    def flops(self, cfg: JambaConfig, seq_len: int) -> Optional[float]:
        try:
            from jamba.flops import flops_per_token
        except ImportError:
            return None
        return float(flops_per_token(cfg, seq_len))

    def fill(self, res: Result, cfg: JambaConfig, point: Point, secs: List[float], losses: List[float]) -> None:
        total = sum(secs)
        res.tokens_per_s = point.tokens * len(secs) / total
        res.step_ms_median = statistics.median(secs) * 1e3
        res.step_ms_mean = total / len(secs) * 1e3
        fpt = self.flops(cfg, point.seq_len)
        if fpt is not None:
            res.tflops = res.tokens_per_s * fpt / 1e12
            if self.ceiling:
                res.mfu = res.tflops / self.ceiling
        res.peak_alloc_gib, res.peak_reserved_gib = peak_gib(self.device)
        res.loss_first, res.loss_last = losses[0], losses[-1]
        res.losses = [round(x, 5) for x in losses]

    # ---- one throughput point --------------------------------------------------------------------
    def run_point(self, impl: str, point: Point) -> Result:
        res = Result(impl, point.seq_len, point.micro_batch, ac_label(point.ac))
        free_memory(self.device)
        reset_peak(self.device)
        model = opt = batches = step = None
        failure = None
        try:
            cfg, model, opt, res.info = self.build(impl, point.ac)
            batches = make_batches(cfg.vocab_size, point, self.device)
            step = make_step(impl, model, opt, **self.step_options)
            losses = [step(batches[i % len(batches)]) for i in range(self.args.warmup)]
            timer = StepTimer(self.device)
            timer.mark()
            for i in range(self.args.steps):
                losses.append(step(batches[i % len(batches)]))
                timer.mark()
            secs = timer.step_seconds()
            losses = [float(x) for x in losses]
            self.fill(res, cfg, point, secs, losses)
            if not all(math.isfinite(x) for x in losses):
                res.status, res.error = "error", f"non-finite loss {losses}"
            if self.args.profile:
                self.profiles.append(self.profile(impl, point, step, batches[0]))
        except OOM_ERRORS as e:
            failure = ("oom", str(e).splitlines()[0][:300])
        except Exception as e:  # noqa: BLE001 - record and keep benchmarking the other points
            failure = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            log.exception("%s %s failed", impl, point.label())
        if failure:  # outside the except block, so the traceback's frames (and their tensors) are gone
            res.status, res.error = failure
            res.peak_alloc_gib, res.peak_reserved_gib = peak_gib(self.device)
        del model, opt, batches, step
        free_memory(self.device)
        return res

    # ---- longest trainable sequence --------------------------------------------------------------
    def find_max_seq(self, impl: str, seq_lens: Sequence[int], ac: Sequence[str]) -> dict:
        """Longest batch-1 sequence that trains one step (fwd+bwd+AdamW), trying `seq_lens` in order."""
        out = {"impl": impl, "ac": ac_label(ac), "max_ok": None, "tries": []}
        free_memory(self.device)
        cfg, model, opt, info = self.build(impl, ac)
        out["info"] = info
        step = make_step(impl, model, opt, **self.step_options)
        for seq_len in seq_lens:
            point = Point(seq_len, 1, tuple(ac))
            reset_peak(self.device)
            failure, batch = None, None
            t0 = time.perf_counter()
            try:
                batch = make_batches(cfg.vocab_size, point, self.device, n=1)[0]
                loss = float(step(batch))
                sync(self.device)
            except OOM_ERRORS as e:
                failure = ("oom", str(e).splitlines()[0][:200])
            except Exception as e:  # noqa: BLE001 - e.g. a kernel's size limit; stop the search there
                failure = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            secs = time.perf_counter() - t0
            alloc, reserved = peak_gib(self.device)
            try_ = {"seq_len": seq_len, "status": failure[0] if failure else "ok",
                    "peak_alloc_gib": alloc, "peak_reserved_gib": reserved, "step_s": secs}
            if failure:
                try_["error"] = failure[1]
                opt.zero_grad(set_to_none=True)
            else:
                try_["loss"] = loss
                try_["tokens_per_s"] = seq_len / secs
                out["max_ok"] = seq_len
            out["tries"].append(try_)
            print(f"  find-max-seq {impl:4s} ac={ac_label(ac):8s} seq {seq_len:>8d}: {try_['status']:5s} "
                  f"peak {_fmt(alloc, '.1f')} GiB  {secs:6.1f} s"
                  + (f"  ({try_['error'][:120]})" if failure else ""), flush=True)
            del batch
            free_memory(self.device)
            if failure:
                break
        del model, opt, step
        free_memory(self.device)
        return out

    # ---- profile ---------------------------------------------------------------------------------
    def profile(self, impl: str, point: Point, step, batch) -> dict:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sync(self.device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            step(batch)
            sync(self.device)
        wall = time.perf_counter() - t0
        summary = summarize_profile(prof, self.device, wall, top=self.args.profile_top)
        summary.update(impl=impl, point=point.label(), ac=ac_label(point.ac))
        if self.device.type == "cuda":
            import tempfile
            trace_dir = Path(self.args.trace_dir or tempfile.mkdtemp(prefix="bench_trace_"))
            trace_dir.mkdir(parents=True, exist_ok=True)
            trace = trace_dir / f"trace_{impl}_{point.label()}.json"
            prof.export_chrome_trace(str(trace))
            summary["timeline"] = trace_timeline(trace)
            if not self.args.trace_dir:
                trace.unlink()
        print_profile(summary)
        return summary


# ================================================================================================
# Profile summaries
# ================================================================================================

KERNEL_FAMILIES = [  # (family, regex on the kernel name), first match wins
    ("selective scan (ours / mamba-ssm)", r"selective_scan|jamba_scan::"),
    ("causal conv1d", r"causal_conv1d|conv1d"),
    ("attention (flash/cuDNN/SDPA)", r"flash|fmha|attention|sdpa|cudnn"),
    ("grouped GEMM (experts)", r"grouped|_grouped_mm"),
    ("GEMM (cuBLAS/CUTLASS)", r"gemm|sm90_xmma|nvjet|cutlass|cublas|wgmma|matmul|aten::(mm|addmm|bmm|linear)$"),
    ("optimizer (AdamW)", r"adam"),
    ("cross-entropy / softmax", r"softmax|cross_entropy|nll|log_softmax|logsumexp"),
    ("MoE routing (topk/sort/scatter/index)", r"topk|sort|scatter|gather|index|radix|histc|bincount|cumsum|scan_"),
    ("reductions / norms", r"reduce|norm|mean|sum"),
    ("elementwise / copies", r"elementwise|vectorized|copy|fill|cat|memcpy|memset|unrolled|Memcpy|Memset"),
    ("triton (compiled)", r"triton"),
]


# CUPTI's own events, not operators (their "device time" spans other operators' kernels)
PROFILER_MARKERS = {"Command Buffer Full", "Activity Buffer Request"}


def kernel_family(name: str) -> str:
    for fam, pat in KERNEL_FAMILIES:
        if re.search(pat, name, re.IGNORECASE):
            return fam
    return "other"


def _event_time_us(e, device: torch.device) -> float:
    if device.type == "cuda":
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0
    return float(e.self_cpu_time_total)


def summarize_profile(prof, device: torch.device, wall_s: float, top: int = 25) -> dict:
    """Top kernels by device time (GPU) or top ops by self CPU time (CPU), and a breakdown by family."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    if device.type == "cuda":
        rows = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                and "#" not in e.key and not e.key.startswith("ProfilerStep")]  # skip user annotations
    else:
        rows = list(events)
    rows = [(e.key, e.count, _event_time_us(e, device)) for e in rows]
    rows = [r for r in rows if r[2] > 0]
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows) or 1.0
    families: Dict[str, float] = {}
    for name, _, us in rows:
        fam = kernel_family(name)
        families[fam] = families.get(fam, 0.0) + us
    ops = []
    if device.type == "cuda":  # CPU-side operators (aten::*, autograd nodes) by the device time of their own kernels
        ops = [(e.key, e.count, _event_time_us(e, device)) for e in events
               if getattr(e, "device_type", None) == DeviceType.CPU and not e.key.startswith("ProfilerStep")
               and e.key not in PROFILER_MARKERS]
        ops = sorted((o for o in ops if o[2] > 0), key=lambda o: -o[2])[:top]
    return {
        "device": device.type, "wall_ms": wall_s * 1e3, "kernel_ms": total / 1e3,
        "ops": [{"name": n, "calls": c, "ms": us / 1e3} for n, c, us in ops],
        "top": [{"name": n, "calls": c, "ms": us / 1e3, "pct": 100 * us / total} for n, c, us in rows[:top]],
        "families": [{"family": f, "ms": us / 1e3, "pct": 100 * us / total}
                     for f, us in sorted(families.items(), key=lambda kv: -kv[1])],
    }


def trace_timeline(trace_path: Path, top_gaps: int = 12) -> dict:
    """GPU busy time of one profiled step from its Chrome trace: the union of kernel intervals against
    the span from the first kernel's start to the last kernel's end, and the longest idle gaps with the
    kernels around them (a gap after a host sync or a Python-heavy region shows up here)."""
    events = json.loads(Path(trace_path).read_text()).get("traceEvents", [])
    kernels = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""))
                     for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e)
    if not kernels:
        return {}
    busy, gaps, end = 0.0, [], kernels[0][0]
    prev_name = ""
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, prev_name, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, prev_name = stop, name
    span = end - kernels[0][0]
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
            "kernels": len(kernels), "gaps_over_50us": sum(1 for g in gaps if g[0] > 50),
            "idle_in_gaps_over_50us_ms": sum(g[0] for g in gaps if g[0] > 50) / 1e3,
            "top_gaps": [{"us": g[0], "after": g[1][:80], "before": g[2][:80]} for g in gaps[:top_gaps]]}


def print_profile(s: dict) -> None:
    what = "kernels by device time" if s["device"] == "cuda" else "ops by self CPU time"
    print(f"\n== profile {s['impl']} {s['point']} ac={s['ac']}: one step, wall {s['wall_ms']:.1f} ms, "
          f"sum of {'kernel' if s['device'] == 'cuda' else 'op'} time {s['kernel_ms']:.1f} ms ==")
    print(f"top {what}:")
    for r in s["top"]:
        name = r["name"] if len(r["name"]) <= 100 else r["name"][:97] + "..."
        print(f"  {r['ms']:9.2f} ms {r['pct']:5.1f}% {r['calls']:6d}x  {name}")
    print("by family:")
    for r in s["families"]:
        print(f"  {r['ms']:9.2f} ms {r['pct']:5.1f}%  {r['family']}")
    if s.get("ops"):
        print("top operators by self device time (kernels they launched):")
        for r in s["ops"]:
            print(f"  {r['ms']:9.2f} ms {r['calls']:6d}x  {r['name'][:100]}")
    t = s.get("timeline")
    if t:
        print(f"GPU timeline: span {t['span_ms']:.1f} ms, busy {t['busy_ms']:.1f} ms, idle {t['idle_ms']:.1f} ms "
              f"over {t['kernels']} kernels; {t['gaps_over_50us']} gaps > 50 us hold "
              f"{t['idle_in_gaps_over_50us_ms']:.1f} ms; longest gaps:")
        for g in t["top_gaps"]:
            print(f"  {g['us']:8.0f} us  after {g['after']}  before {g['before']}")


# ================================================================================================
# Output
# ================================================================================================

def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(results: List[Result], ceiling: Optional[float], dtype: str = "bf16") -> str:
    hf = {(r.seq_len, r.micro_batch, r.ac): r for r in results if r.impl == "hf" and r.status == "ok"}
    head = (f"{'impl':5s} {'seq x batch':>13s} {'ac':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
            f"{'peak GiB':>9s} {'step ms':>9s} {'loss0':>7s} {'ours/HF':>8s}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = None
        if r.impl == "ours" and r.status == "ok":
            ref = hf.get((r.seq_len, r.micro_batch, r.ac))
            ratio = r.tokens_per_s / ref.tokens_per_s if ref else None
        lines.append(
            f"{r.impl:5s} {f'{r.seq_len}x{r.micro_batch}':>13s} {r.ac:>8s} {_fmt(r.tokens_per_s, ',.0f'):>10s} "
            f"{_fmt(r.tflops, '.1f'):>8s} {_fmt(r.mfu and 100 * r.mfu, '.1f'):>5s}% "
            f"{_fmt(r.peak_alloc_gib, '.1f'):>9s} {_fmt(r.step_ms_median, '.1f'):>9s} "
            f"{_fmt(r.loss_first, '.4f'):>7s} {_fmt(ratio, '.2f'):>8s}  {r.status}"
            + (f" ({r.error[:80]})" if r.error else ""))
    if ceiling:
        lines.append(f"MFU against the measured {dtype} matmul ceiling of {ceiling:.4g} TFLOP/s")
    return "\n".join(lines)


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    for mod in ("transformers", "mamba_ssm", "causal_conv1d"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            env[mod] = None
    try:
        from jamba.ops.kernels import kernels_available

        env["our_kernels"] = kernels_available()
    except Exception:  # noqa: BLE001
        pass
    env["git"] = git_version(Path(__file__).resolve().parents[1])
    return env


def git_version(root: Path) -> Optional[str]:
    """The checkout's commit, with "-dirty" when tracked files differ from it: a figure measured on uncommitted
    code must not be credited to the commit it started from. None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],  # no tags
                             capture_output=True, text=True, cwd=root, timeout=10)
    except Exception:  # noqa: BLE001 - no git
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# ================================================================================================
# CLI
# ================================================================================================

def _override(item: str) -> Tuple[str, object]:
    if "=" not in item:
        raise argparse.ArgumentTypeError(f"--set {item!r} must be KEY=VALUE (a JambaConfig field)")
    k, v = item.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-3b", help="model preset of jamba.config.PRESETS (default bench-3b)")
    p.add_argument("--set", dest="override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a JambaConfig field (JSON value), e.g. --set loss_chunk_size=8192")
    p.add_argument("--points", default="4096x4,16384x1", help="SEQxBATCH[@AC],... (default 4096x4,16384x1)")
    p.add_argument("--ac", default="none", help="activation checkpointing for points without @AC: none, all, "
                                                "or kinds joined by '+' (mamba, attention, mlp, moe)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per point (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per point (default 10)")
    p.add_argument("--hf", action="store_true", help="also benchmark transformers' JambaForCausalLM (same weights)")
    p.add_argument("--hf-only", action="store_true", help="benchmark only transformers' model")
    p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation (default sdpa)")
    p.add_argument("--hf-experts", default=None, help="HF experts_implementation (default: transformers' choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decoder layers, as train.compile=true (parallel/compile.py)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode with --compile (e.g. reduce-overhead)")
    p.add_argument("--find-max-seq", action="store_true", help="search the longest batch-1 sequence that trains "
                                                               "(instead of the throughput points)")
    p.add_argument("--max-seq-list", default=DEFAULT_MAX_SEQ_LIST,
                   help=f"sequence lengths tried in order by --find-max-seq (default {DEFAULT_MAX_SEQ_LIST})")
    p.add_argument("--profile", action="store_true", help="profile one extra step per point and implementation")
    p.add_argument("--profile-top", type=int, default=25, help="kernels listed by --profile (default 25)")
    p.add_argument("--trace-dir", default=None, help="also write Chrome traces of the profiled steps here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights and activations dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--trainer-recipe", action="store_true",
                   help="train.py's single-GPU numerics: fp32 weights and AdamW state, bf16 autocast, gradient "
                        "clipping (implies --dtype fp32); compare train.py's tokens/s with this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ceiling-size", type=int, default=None,
                   help="n of the n^3 matmul that measures the ceiling (default 8192 on CUDA, 512 on CPU; 0 = skip)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    args = p.parse_args(argv)
    if args.trainer_recipe:
        if args.dtype not in (None, "fp32"):
            p.error(f"--trainer-recipe keeps fp32 weights (autocast computes in bf16); drop --dtype {args.dtype}")
        args.dtype = "fp32"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.ceiling_size is None:
        args.ceiling_size = 8192 if args.device.startswith("cuda") else 512
    if args.warmup < 0 or args.steps < 1:
        p.error(f"--warmup={args.warmup} must be >= 0 and --steps={args.steps} >= 1")
    try:
        args.ac = parse_ac(args.ac)
        args.points = parse_points(args.points, args.ac)
        args.max_seq_list = [int(s) for s in args.max_seq_list.split(",") if s.strip()]
        get_preset(args.preset, **dict(args.override))
    except (ValueError, ConfigError) as e:
        p.error(str(e))
    args.impls = ["hf"] if args.hf_only else (["ours", "hf"] if args.hf else ["ours"])
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bench = Bench(args)
    env = environment()
    print("bench environment:", json.dumps(env), flush=True)
    if args.ceiling_size:
        # the trainer recipe's matmuls run in bf16 under autocast: that is their ceiling
        ceiling_dtype = torch.bfloat16 if args.trainer_recipe and bench.device.type == "cuda" else bench.dtype
        bench.ceiling = matmul_ceiling(bench.device, args.ceiling_size, ceiling_dtype)
        print(f"measured matmul ceiling: {bench.ceiling:.4g} TFLOP/s ({str(ceiling_dtype)[6:]}, n={args.ceiling_size})",
              flush=True)
    cfg = get_preset(args.preset, **dict(args.override))
    report = {"env": env, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                                   if k != "points"},
              "points": [asdict(pt) for pt in args.points], "preset": args.preset, "config": cfg.to_dict(),
              "ceiling_tflops": bench.ceiling, "results": [], "max_seq": [], "profiles": bench.profiles}

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))

    if args.find_max_seq:
        for impl in args.impls:
            report["max_seq"].append(bench.find_max_seq(impl, args.max_seq_list, args.ac))
            save()
        print("\nlongest trainable batch-1 sequence:")
        for r in report["max_seq"]:
            print(f"  {r['impl']:5s} ac={r['ac']:8s} max_ok={r['max_ok']}  "
                  f"(first failure: {next((t['seq_len'] for t in r['tries'] if t['status'] != 'ok'), 'none')})")
    else:
        results: List[Result] = []
        for point in args.points:
            for impl in args.impls:
                res = bench.run_point(impl, point)
                results.append(res)
                report["results"].append(asdict(res))
                save()
                print(f"  {impl:4s} {point.label():>12s} ac={res.ac}: {res.status} "
                      f"{_fmt(res.tokens_per_s, ',.0f')} tokens/s, peak {_fmt(res.peak_alloc_gib, '.1f')} GiB, "
                      f"loss {_fmt(res.loss_first, '.4f')} -> {_fmt(res.loss_last, '.4f')}"
                      + (f" ({res.error})" if res.error else ""), flush=True)
        print("\n" + format_table(results, bench.ceiling, "autocast bf16" if args.trainer_recipe else args.dtype))
    save()
    return report


if __name__ == "__main__":
    main()
