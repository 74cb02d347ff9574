"""Plot a run's metrics.jsonl:  python -m trainer.plot RUN_DIR [--out DIR]

Writes loss.png (training loss, and validation loss where present), lr.png and throughput.png (tokens/s,
and MFU where logged) into the run directory (or --out). Works on a run that is still going.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List


def load_metrics(run_dir: Path) -> List[Dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run directory (it holds metrics.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    by_step: Dict = {}
    for r in records:  # a resumed run may log a step twice: the last one wins
        by_step[(r["step"], "val_loss" in r)] = r
    return [by_step[k] for k in sorted(by_step)]


def plot_run(run_dir: Path, out_dir: Path = None) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = load_metrics(run_dir)
    train = [r for r in recs if r.get("loss") is not None]
    val = [r for r in recs if r.get("val_loss") is not None]
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
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
    p.add_argument("run_dir", type=Path, help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: the run directory)")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
