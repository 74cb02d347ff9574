"""How long a checkpoint stalls training: train.py with synchronous and with asynchronous saves, same run.

Runs `train.py` twice (each in a fresh run directory under --out) with `checkpoint.async_save=false` and
`=true`, saving every `--every` steps, and reads back what each run logged: per save, the seconds training
waited (synchronous: the whole save; asynchronous: the copy to CPU memory) and the background write time;
per step, the tokens/s of steps right after a save against the others (the write competes for host CPU and
PCIe). Extra arguments go to train.py (after ours: they win). The learning rate warm-up is
off (`optim.warmup_steps=0`): a recipe's is longer than the few steps timed here.

    python -m launch.bench_checkpoint -- experiment=bench_3b train.global_batch_tokens=16384         # 1 GPU
    python -m launch.bench_checkpoint --nproc 2 -- experiment=bench_3b parallel=fsdp train.global_batch_tokens=32768
    python -m launch.bench_checkpoint --steps 8 --every 3 -- experiment=debug train.num_threads=1    # CPU
    python -m launch.bench_checkpoint --modes async --steps 7 --every 3 -- experiment=bench_3b ...   # async only
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from launch.results import report_json

_SAVE = re.compile(r"checkpoint step (\d+): (?:staged in ([\d.]+) s, written in ([\d.]+) s in the background"
                   r"|written in ([\d.]+) s, training waited)")
_WAIT = re.compile(r"checkpoint step (\d+): waited ([\d.]+) s for the previous")


def parse(log: str) -> List[Dict[str, float]]:
    """One dict per save: step, stall_s (what training waited), write_s (in the background)."""
    waited = {int(m.group(1)): float(m.group(2)) for m in _WAIT.finditer(log)}
    saves = []
    for m in _SAVE.finditer(log):
        step = int(m.group(1))
        if m.group(2) is not None:
            stall, write = float(m.group(2)), float(m.group(3))
        else:
            stall, write = float(m.group(4)), 0.0
        saves.append({"step": step, "stall_s": stall + waited.get(step, 0.0), "write_s": write})
    return saves


def run(mode: str, args, extra: List[str]) -> Dict[str, object]:
    run_dir = Path(args.out) / mode
    launcher = ([sys.executable, "train.py"] if args.nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                 "train.py"])
    cmd = launcher + [f"hydra.run.dir={run_dir}", f"train.max_steps={args.steps}", f"checkpoint.every={args.every}",
                      "checkpoint.keep_last=2", "checkpoint.overwrite=true", "logging.log_every=1",
                      "logging.progress_bar=false", "logging.wandb.mode=disabled", "train.eval_every=0",
                      # a recipe's warm-up is longer than these few steps (bench_3b: 200) and would be refused
                      "optim.warmup_steps=0",
                      f"checkpoint.async_save={'true' if mode == 'async' else 'false'}", *extra]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{log[-4000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = {r["step"]: r["tokens_per_s"] for r in recs if "tokens_per_s" in r}
    saves = parse(log)
    after = [tps[s["step"] + 1] for s in saves if s["step"] + 1 in tps]
    others = [v for k, v in tps.items() if k > 2 and k - 1 not in {s["step"] for s in saves}]
    return {"saves": saves, "tokens_per_s_after_save": statistics.median(after) if after else None,
            "tokens_per_s_other": statistics.median(others) if others else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default="runs/bench_checkpoint")
    p.add_argument("--modes", default="sync,async", help="comma-separated: sync, async (both by default)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("extra", nargs="*", help="train.py overrides (after --)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    bad = sorted(set(modes) - {"sync", "async"})
    if bad:
        p.error(f"--modes {args.modes}: unknown mode(s) {bad}; use sync, async or sync,async")
    results = {mode: run(mode, args, args.extra) for mode in modes}
    for mode, r in results.items():
        for s in r["saves"]:
            print(f"{mode:5s} step {s['step']:4d}: training waited {s['stall_s']:7.2f} s, "
                  f"background write {s['write_s']:7.2f} s")
        after, other = r["tokens_per_s_after_save"], r["tokens_per_s_other"]
        print(f"{mode:5s} tokens/s: step after a save {after:,.0f}, other steps {other:,.0f} (medians)"
              if after is not None and other is not None else f"{mode:5s} tokens/s: {after} / {other}")
    report_json(results, args.json, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
