"""Plot a run's metrics.jsonl:  python -m trainer.plot RUN_DIR|METRICS_JSONL [--out DIR] [--smooth 0.9]

Writes loss.png (training loss: the logged single-step values, thin, and their exponential moving average,
bold; validation loss where present), lr.png and throughput.png (tokens/s, and MFU where logged) into the run
directory (or --out). Works on a run that is still going; one without a logged training step yet is an error
(exit 2), not three blank plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from trainer.jsonl import read_jsonl


def metrics_path(run: Path) -> Path:
    """The metrics file of `run`: a run directory's metrics.jsonl, or `run` itself when it is a file (the path
    a user tab-completes to, as launch.ep_balance takes it)."""
    run = Path(run)
    return run if run.is_file() else run / "metrics.jsonl"


def load_metrics(run: Path) -> List[Dict]:
    """The records of a run directory's metrics.jsonl (or of that file), one per step and kind."""
    path = metrics_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run directory (it holds metrics.jsonl)")
    records = read_jsonl(path, torn_anywhere=True)  # a line cut short by a crash is skipped
    by_step: Dict = {}
    for r in records:  # a resumed run may log a step twice: the last one wins
        by_step[(r["step"], "val_loss" in r)] = r
    return [by_step[k] for k in sorted(by_step)]


class NoRecords(ValueError):
    """metrics.jsonl holds no training step yet (a run that failed at start leaves an empty one)."""


def ema(values: List[float], beta: float) -> List[float]:
    """Exponential moving average with bias correction (so the first points are not pulled towards 0):
    m_t = beta * m_{t-1} + (1 - beta) * x_t, reported as m_t / (1 - beta^t). beta = 0 returns the values."""
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** t))
    return out


def plot_run(run_dir: Path, out_dir: Path = None, smooth: float = 0.9) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = metrics_path(run_dir)
    run_dir = path.parent
    recs = load_metrics(path)
    train = [r for r in recs if r.get("loss") is not None]
    val = [r for r in recs if r.get("val_loss") is not None]
    if not train:  # checked before anything is written: blank PNGs would look like a plotting bug
        raise NoRecords(f"{path}: no records yet (no training step logged), nothing to plot; "
                        "try again once the run has logged its first steps")
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    if smooth > 0:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (logged steps)")
        ax.plot(steps, ema(losses, smooth), color="tab:blue", linewidth=2, label=f"train loss, EMA {smooth:g}")
    else:
        ax.plot(steps, losses, color="tab:blue", label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange",
                label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    mfu = [r for r in train if r.get("mfu") is not None]
    if mfu:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in mfu], [100 * r["mfu"] for r in mfu], color="tab:orange", label="MFU")
        ax2.set_ylabel("MFU (%)")
    save(fig, "throughput.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="run directory (holds metrics.jsonl), or its metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: the run directory)")
    p.add_argument("--smooth", type=float, default=0.9,
                   help="EMA factor of the smoothed loss line, in [0, 1) (0: raw line only; default 0.9)")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth={args.smooth}: give a factor in [0, 1), e.g. 0.9")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file: give a directory for the PNGs", file=sys.stderr)
        return 2
    try:
        for path in plot_run(args.run_dir, args.out, args.smooth):
            print(path)
    except (FileNotFoundError, NoRecords) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
