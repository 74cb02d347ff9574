"""How evenly expert parallelism would split a run's MoE work, from the expert counts in its metrics.jsonl.

    python -m launch.ep_balance runs/bench-3b/base --skip 32          # every EP size that divides the experts
    python -m launch.ep_balance runs/bench-3b/base --ep 2,8 --skip 32

With expert parallelism every MoE layer's all-to-alls wait for the busiest EP rank's grouped GEMMs, so a step
spends on expert work what the busiest rank does, layer by layer: sum over layers of max over ranks, where a
balanced split would spend the mean. The trainer logs each logged step's routed token copies per layer and
expert (`moe_counts`, summed over the step's micro-batches and data-parallel ranks); for each EP size this
reports the busiest rank's load over the mean (1.00 = balanced; rank r holds experts [r E/ep, (r+1) E/ep), as
parallel/expert_parallel.py places them), averaged over the MoE layers (every layer routes the same number of
token copies, so that mean is what the step's expert time grows by) and at the worst layer of any record. Any
run works, also one on a single GPU, so it tells before a multi-GPU job how much EP=N would lose to the routing
the model has learnt. The figures are lower bounds: the counts are a whole step's, summed over its micro-batches
and over all data-parallel ranks, while each exchange sees one micro-batch of one EP group's ranks.

Two more columns say where the imbalance comes from. "pooled" is the same load of the counts summed over all
the records: what stays uneven over the whole run, which better expert biases or another placement of the
experts could remove. "chance" is what routing every token to top-k distinct experts uniformly at random would
leave (normal approximation: 1 + E[max of ep standard normals] / sqrt(copies per rank), the excess shrunk by
sqrt((E - k) / (E - 1)) because one token's k copies never share an expert; k is read from the run's
config.yaml, or --top-k). What a step shows above both is its batch's content, which no bias set from earlier
steps can foresee.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launch.results import report_json
from trainer.jsonl import read_jsonl


def busiest_rank_loads(counts: Sequence[Sequence[float]], ep: int) -> List[float]:
    """counts (MoE layers, experts) -> per layer, the busiest of `ep` ranks' token copies over the ranks' mean
    (layers that routed nothing are left out)."""
    loads = []
    for row in counts:
        if len(row) % ep:
            raise ValueError(f"--ep {ep} must divide the number of experts ({len(row)})")
        per = len(row) // ep
        ranks = [sum(row[r * per:(r + 1) * per]) for r in range(ep)]
        mean = sum(ranks) / ep
        if mean > 0:
            loads.append(max(ranks) / mean)
    return loads


def expected_max_normal(k: int) -> float:
    """E[max of k independent standard normals] (0 for k=1; 1/sqrt(pi) for 2), by quadrature of
    x k phi(x) Phi(x)^(k-1) over [-10, 10]."""
    if k < 2:
        return 0.0
    h, total = 1e-3, 0.0
    for i in range(-10_000, 10_001):
        x = i * h
        phi = math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        total += x * k * phi * (0.5 * (1 + math.erf(x / math.sqrt(2)))) ** (k - 1)
    return total * h


def chance_loads(counts: Sequence[Sequence[float]], ep: int, emax: float, top_k: int = 1) -> List[float]:
    """Per layer that routed anything, the busiest rank's expected load over the mean had each token picked
    `top_k` distinct experts uniformly at random: 1 + emax sqrt((E - k) / (E - 1)) / sqrt(copies / ep),
    emax = expected_max_normal(ep) (a rank's count is hypergeometric per token: its variance is the
    independent copies' times (E - k) / (E - 1))."""
    experts = len(counts[0]) if counts else 1
    shrink = math.sqrt((experts - top_k) / (experts - 1)) if experts > 1 else 0.0
    return [1 + emax * shrink / math.sqrt(sum(row) / ep) for row in counts if sum(row) > 0]


def top_k_of(run: Path) -> Optional[int]:
    """model.num_experts_per_tok from the run directory's config.yaml (train.py writes it), if there is one."""
    cfg = (run if run.is_dir() else run.parent) / "config.yaml"
    if not cfg.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        k = OmegaConf.select(OmegaConf.load(cfg), "model.num_experts_per_tok")
        return int(k) if k is not None else None
    except Exception as e:  # noqa: BLE001 - a damaged copy only costs the chance column's top-k
        print(f"ep_balance: could not read {cfg} ({type(e).__name__}: {e}); the chance column assumes top-1 "
              f"(give --top-k)", file=sys.stderr)
        return None


def read_counts(path: Path, skip: int) -> List[Dict]:
    """The records of metrics.jsonl (a file or a run directory) after step `skip` that carry `moe_counts`."""
    f = path / "metrics.jsonl" if path.is_dir() else path
    if not f.is_file():
        raise SystemExit(f"ep_balance: no metrics file at {f} (give a run directory or its metrics.jsonl)")
    records = read_jsonl(f, torn_anywhere=True)  # a run still writing, or killed mid-line
    return [r for r in records if isinstance(r, dict) and r.get("moe_counts") and r.get("step", 0) > skip]


def experts_of(records: List[Dict]) -> int:
    """The number of experts every record's counts have (one model per file), else an error naming both."""
    shapes = {len(layer) for r in records for layer in r["moe_counts"]}
    layers = {len(r["moe_counts"]) for r in records}
    if len(shapes) != 1 or len(layers) != 1:
        what = (f"{sorted(shapes)} experts per layer" if len(shapes) != 1 else f"{sorted(layers)} MoE layers")
        raise SystemExit(f"ep_balance: the records count {what}: give the metrics of one model (--skip past the "
                         f"records of another)")
    return shapes.pop()


def summarise(records: List[Dict], eps: Sequence[int], top_k: int = 1) -> List[Dict]:
    rows = []
    pooled = [[0.0] * len(records[0]["moe_counts"][0]) for _ in records[0]["moe_counts"]]
    for r in records:
        for layer, row in enumerate(r["moe_counts"]):
            pooled[layer] = [a + b for a, b in zip(pooled[layer], row)]
    for ep in eps:
        per_record = [busiest_rank_loads(r["moe_counts"], ep) for r in records]
        per_record = [loads for loads in per_record if loads]
        if not per_record:
            continue
        means = [statistics.fmean(loads) for loads in per_record]
        emax = expected_max_normal(ep)
        chance = [statistics.fmean(c) for c in (chance_loads(r["moe_counts"], ep, emax, top_k) for r in records) if c]
        rows.append({"ep": ep, "experts_per_rank": len(records[0]["moe_counts"][0]) // ep, "records": len(means),
                     "mean_load_median": statistics.median(means), "mean_load_mean": statistics.fmean(means),
                     "mean_load_worst": max(means), "worst_layer": max(max(loads) for loads in per_record),
                     "pooled_load": statistics.fmean(busiest_rank_loads(pooled, ep)),
                     "chance_load": statistics.fmean(chance)})
    return rows


def markdown(rows: List[Dict]) -> str:
    lines = ["| ep | experts per rank | busiest rank's load, mean over layers: median / mean / worst record | "
             "worst layer (any record) | pooled over the records | chance | records |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ep']} | {r['experts_per_rank']} | {r['mean_load_median']:.3f} / "
                     f"{r['mean_load_mean']:.3f} / {r['mean_load_worst']:.3f} | {r['worst_layer']:.2f} | "
                     f"{r['pooled_load']:.3f} | {r['chance_load']:.3f} | {r['records']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory or its metrics.jsonl")
    ap.add_argument("--ep", default=None, help="comma-separated EP sizes, each dividing the number of experts "
                    "(default: every such size above 1)")
    ap.add_argument("--skip", type=int, default=0, help="leave out records up to this step (the routing's start)")
    ap.add_argument("--top-k", type=int, default=None, help="experts per token, for the chance column (default: "
                    "the run's config.yaml; 1, independent copies, without one)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    eps = None
    if args.ep is not None:
        try:
            eps = sorted({int(x) for x in args.ep.split(",") if x.strip()})
        except ValueError:
            ap.error(f"--ep must be comma-separated integers, got {args.ep!r}")
        if not eps or min(eps) < 1:
            ap.error(f"--ep must list EP sizes >= 1, got {args.ep!r}")
    records = read_counts(args.run, args.skip)
    if not records:
        print(f"ep_balance: no record after step {args.skip} in {args.run} has expert counts (`moe_counts`: a model "
              f"with MoE layers, trained by this version of train.py)", file=sys.stderr)
        return 2
    experts = experts_of(records)
    if eps is None:
        eps = [ep for ep in range(2, experts + 1) if experts % ep == 0]
    bad = [ep for ep in eps if experts % ep]
    eps = [ep for ep in eps if not experts % ep]
    if bad:
        print(f"ep_balance: leaving out --ep {bad}: an EP size must divide the number of experts ({experts})",
              file=sys.stderr)
    if not eps:
        return 2
    top_k = args.top_k if args.top_k is not None else (top_k_of(args.run) or 1)
    if not 1 <= top_k <= experts:
        ap.error(f"--top-k {top_k} must be between 1 and the number of experts ({experts})")
    rows = summarise(records, eps, top_k)
    if not rows:
        print(f"ep_balance: the records after step {args.skip} routed no tokens", file=sys.stderr)
        return 2
    print(markdown(rows))
    report_json({"run": str(args.run), "skip": args.skip, "experts": experts, "top_k": top_k, "rows": rows}, args.json,
                echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
