"""Metrics: metrics.jsonl, log lines, the tqdm progress bar and wandb (all on rank 0), MFU and memory.

metrics.jsonl holds one JSON object per logged step: step, tokens, loss, lr, grad_norm, tokens_per_s, plus
aux_loss, z_loss, skipped (steps), stage, seq_len, mfu (GPU), moe_load_max / moe_load_min and moe_counts (routed
token copies per MoE layer and expert; metrics.jsonl only, for `python -m launch.ep_balance`), mem_gb,
alloc_retries (CUDA caching-allocator retries: a run near its memory limit), gc_ms / gc_full (rank 0's time in
Python's garbage collector since the previous record, and its full collections), and when
non-zero the data counters skipped_json / skipped_utf8 / skipped_field / skipped_empty / skipped_file (bad
documents skipped, each counted once) and split_docs; validation records carry val_loss, val_ppl,
val_tokens (the targets scored, over all ranks) and val_s (seconds the validation took, the first one with its
compilation). A resumed run moves the records of the steps it redoes to
metrics.replayed.jsonl, so metrics.jsonl has each step once. wandb gets the same records. Its run id lives
in <run_dir>/wandb_id, so a resumed or requeued job continues the same wandb run. Only wandb's public API is
used (`init`, `Settings`, `Run.log`, `Run.finish`; tested with the range pinned in pyproject.toml): the run
id is generated here, since `wandb.util.generate_id` is gone in wandb 0.31. A failing `wandb.init` never stops
training but is reported loudly, once, with the exception and the fix.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import resource
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from trainer.checkpoint_integrity import fsync_dir, write_file
from trainer.config import LoggingConfig

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s of one accelerator (no sparsity), matched by substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "A10G": 125.0, "B200": 2250.0, "GH200": 989.0}


def gpu_peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # longest match first ("H100 PCIe" before "H100")
        if key in name:
            return PEAK_TFLOPS[key]
    log.warning("unknown GPU %r: no MFU (set logging.peak_tflops)", name)
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max allocated, else the process's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2**20


NOT_TO_WANDB = frozenset({"step", "moe_counts"})
"""Record keys kept out of wandb: the step is its own argument; the per-layer expert counts are a table for
`launch.ep_balance`, not a series to plot."""


def alloc_retries(device: torch.device) -> Dict[str, int]:
    """CUDA caching-allocator retries so far (each frees cached blocks and synchronises the device: a run
    near its memory limit slows down without failing); {} elsewhere."""
    if device.type != "cuda":
        return {}
    return {"alloc_retries": int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))}


def moe_balance(counts: Optional[torch.Tensor], ep: int = 1) -> Dict[str, float]:
    """Expert load relative to the mean, worst over MoE layers: max (>= 1) and min (<= 1); 1/1 = balanced.
    counts: (MoE layers, experts), global over the data-parallel ranks; logged as they are too (`moe_counts`), from
    which `python -m launch.ep_balance` tells how evenly any EP size would split the experts' work.

    With expert parallelism (ep > 1; rank r holds experts [r E/ep, (r+1) E/ep)) also `moe_rank_load_max`: the
    busiest ep rank's routed tokens over the mean, worst layer. Every all-to-all waits for that rank's grouped
    GEMM, so EP's step time grows with it (1.25: a quarter more expert work than a balanced split)."""
    if counts is None or counts.numel() == 0:
        return {}
    c = counts.detach().to("cpu", torch.float64)  # one small copy from the device (a logging step)
    mean = c.mean(dim=-1, keepdim=True).clamp_min(1e-9)
    rel = c / mean
    out = {"moe_load_max": rel.max().item(), "moe_load_min": rel.min().item(),
           "moe_counts": c.round().long().tolist()}  # per layer and expert: python -m launch.ep_balance
    if ep > 1 and c.shape[-1] % ep == 0:
        per_rank = c.view(*c.shape[:-1], ep, c.shape[-1] // ep).sum(-1)  # (layers, ep)
        out["moe_rank_load_max"] = (per_rank / per_rank.mean(-1, keepdim=True).clamp_min(1e-9)).max().item()
    return out


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


REPLAYED = "metrics.replayed.jsonl"
DATA_COUNTERS = ("skipped_json", "skipped_utf8", "skipped_field", "skipped_empty", "skipped_file", "split_docs")
"""The data loader's bad-data counters (each bad line once) and long documents split, all data-parallel ranks:
in a training record when non-zero."""


def set_aside_replayed(path: Path, start_step: int) -> int:
    """A resumed run redoes the steps after its checkpoint: move their old records (and a line torn by a kill)
    from metrics.jsonl to metrics.replayed.jsonl beside it, so each step appears once. Returns how many.

    The move is ordered for whoever reads the two files while it happens (a dashboard, the GPU scenario tests,
    which count a step in both as redone): both new versions are written to temporary files first, metrics.jsonl
    is replaced, then metrics.replayed.jsonl. A reader that reads metrics.replayed.jsonl first, then
    metrics.jsonl, can briefly miss the moved records but never sees a step that was not redone twice. A crash
    in between loses nothing: see finish_interrupted_set_aside."""
    replayed, kept_tmp, replayed_tmp = _set_aside_files(path)
    finish_interrupted_set_aside(path)
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        (keep if isinstance(step, int) and step <= start_step else moved).append(line)
    if not moved:
        return 0
    # Both temporaries reach the disk before any replace (fsync), so a node crash cannot leave a replaced file
    # empty; kept_tmp first: while it exists, replayed_tmp is not yet authoritative.
    write_file(kept_tmp, "".join(keep).encode())
    before = replayed.read_text() if replayed.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    write_file(replayed_tmp, (before + "".join(ln if ln.endswith("\n") else ln + "\n" for ln in moved)).encode())
    os.replace(kept_tmp, path)  # the commit point: the moved records now live only in replayed_tmp
    os.replace(replayed_tmp, replayed)
    fsync_dir(path.parent)
    return len(moved)


def _set_aside_files(path: Path) -> tuple:
    """(metrics.replayed.jsonl, metrics.jsonl's temporary, the replayed file's temporary) beside `path`."""
    return path.with_name(REPLAYED), path.with_name(path.name + ".tmp"), path.with_name(REPLAYED + ".tmp")


def finish_interrupted_set_aside(path: Path) -> None:
    """A set-aside of metrics.jsonl at `path` killed midway: if metrics.jsonl was already replaced (its
    temporary is gone), the replayed temporary holds the only copy of the moved records and becomes
    metrics.replayed.jsonl; otherwise metrics.jsonl still has them and both temporaries are dropped (the move is
    redone from scratch). Also for whoever moves a run's metrics elsewhere (checkpoint.overwrite)."""
    replayed, kept_tmp, replayed_tmp = _set_aside_files(path)
    if replayed_tmp.is_file() and not kept_tmp.is_file():
        os.replace(replayed_tmp, replayed)
    for tmp in (replayed_tmp, kept_tmp):  # in this order: a kill in between must not leave replayed_tmp alone
        tmp.unlink(missing_ok=True)


def new_wandb_run_id(length: int = 8) -> str:
    """A fresh wandb run id: lowercase letters and digits (what wandb accepts in a run URL)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _wandb_fix(e: Exception, mode: str, version: str) -> str:
    """What to do about a failed wandb.init: it depends on why (the key, the network, the package)."""
    text = str(e).lower()
    if version == "not installed" or isinstance(e, (ImportError, AttributeError, TypeError)):
        return ("pip install -e . (pins a tested wandb range, see pyproject.toml), or set "
                "logging.wandb.mode=disabled to run without it")
    off = "or logging.wandb.mode=offline (logs locally; `wandb sync` later) or =disabled"
    if mode == "online" and ("api key" in text or "wandb login" in text or "401" in text):
        return f"`wandb login` or set WANDB_API_KEY (and a logging.wandb.entity/project it may write to), {off}"
    if mode == "online":
        return f"check the network and the wandb server (logging.wandb.init_timeout_s), {off}"
    return "set logging.wandb.mode=disabled to run without it"


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops. `log(record)` for training, `log_eval` for validation."""

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig, is_main: bool, total_steps: int,
                 start_step: int = 0, config_dict: Optional[dict] = None):
        self.cfg, self.is_main, self.run_dir = cfg, is_main, Path(run_dir)
        self.bar = None
        self.wandb = None
        self._fh = None
        self._bad_shown: List[str] = []  # the bad-data counts the last log line showed
        if not is_main:
            return
        moved = set_aside_replayed(self.run_dir / "metrics.jsonl", start_step)
        if moved:
            log.info("metrics.jsonl: %d records after step %d (redone by this run) moved to %s", moved, start_step,
                     REPLAYED)
        self._fh = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        self._init_wandb(config_dict)

    def _init_wandb(self, config_dict: Optional[dict]) -> None:
        mode = _wandb_mode(self.cfg.wandb.mode)
        if mode == "disabled":
            return
        id_file = self.run_dir / "wandb_id"
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            if not run_id:
                run_id = new_wandb_run_id()
                id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(
                project=self.cfg.wandb.project, entity=self.cfg.wandb.entity, id=run_id, resume="allow",
                name=self.cfg.wandb.name or self.run_dir.name, tags=list(self.cfg.wandb.tags), mode=mode,
                dir=str(self.run_dir), config=config_dict,
                settings=wandb.Settings(init_timeout=self.cfg.wandb.init_timeout_s, silent=True))
            log.info("wandb: mode %s, run id %s, files in %s", mode, run_id, self.run_dir / "wandb")
        except Exception as e:  # never let the logger stop a training run, but never hide that it is off
            ver = getattr(sys.modules.get("wandb"), "__version__", "not installed")
            log.warning("WANDB IS OFF for this run: wandb.init failed in mode %s (%s: %s; wandb %s). Fix: %s",
                        mode, type(e).__name__, " ".join(str(e).split())[:300], ver, _wandb_fix(e, mode, ver))
            self.wandb = None

    def write(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in NOT_TO_WANDB and v is not None},
                           step=record["step"])

    def log(self, record: Dict[str, Any]) -> None:
        """A training record: jsonl + wandb + a log line."""
        if not self.is_main:
            return
        self.write(record)
        line = (f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            line += f" | MFU {100 * record['mfu']:.1f}%"
        if "moe_load_max" in record:
            line += f" | MoE load max/min {record['moe_load_max']:.2f}/{record['moe_load_min']:.2f}"
        if record.get("aux_loss") is not None:
            line += f" | aux {record['aux_loss']:.4f}"
        line += f" | mem {record['mem_gb']:.2f} GB"
        if record.get("alloc_retries"):
            line += f" ({record['alloc_retries']} allocator retries)"
        if (record.get("gc_ms") or 0) >= 100:  # a pause long enough to slow the window visibly
            line += f" | gc {record['gc_ms']:,.0f} ms ({record.get('gc_full', 0)} full)"
        if record.get("skipped"):
            line += f" | skipped {record['skipped']}"
        # empty documents (the stdlib's empty __init__.py files, blank lines) are counted, not called bad data
        bad = [f"{k[len('skipped_'):]} {record[k]:,}" for k in DATA_COUNTERS if k.startswith("skipped_")
               and k != "skipped_empty" and record.get(k)]
        if bad and bad != self._bad_shown:  # shown when they grow, not on every line (metrics.jsonl has them all)
            line += " | bad data skipped: " + ", ".join(bad)
            self._bad_shown = bad
        self._print(line)

    def log_eval(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.write(record)
        tokens = f" | {record['val_tokens']:,} tokens" if record.get("val_tokens") else ""
        took = f" | {record['val_s']:.1f} s" if record.get("val_s") is not None else ""
        self._print(f"step {record['step']:>6} | val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}"
                    f"{tokens}{took}")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            log.info(line)

    def advance(self, step: int, loss: Optional[float] = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if loss is not None and math.isfinite(loss):
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
                # finish() only tells wandb's service process the run is over; the service writes the rest of
                # the run's log when it closes the stream, which teardown waits for. Its atexit handler would
                # too, but after a gloo run train.py skips atexit (trainer.distributed.exit_process).
                import wandb

                wandb.teardown()
            except Exception as e:  # pragma: no cover
                log.warning("wandb.finish failed: %s", e)
            self.wandb = None


class Throughput:
    """Tokens/s over the steps since the last reading (wall clock, synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate


class GCPauses:
    """Time this process spent in Python's garbage collector since the last reading, and how many of those
    collections were full (generation 2) ones, from `gc.callbacks`. A full collection walks every tracked
    object (a compiled model holds millions: FX graphs, guards, sympy expressions) with the host stopped,
    which shows as a slow logging window; this says whether a slow window was the collector."""

    def __init__(self):
        self._start: Optional[float] = None
        self.ms, self.full = 0.0, 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: Dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.ms += 1e3 * (time.perf_counter() - self._start)
            self.full += info.get("generation") == 2
            self._start = None

    def read(self) -> Dict[str, float]:
        out = {"gc_ms": round(self.ms, 1), "gc_full": self.full}
        self.ms, self.full = 0.0, 0
        return out

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
