"""Per-module forward+backward timings of our layers against transformers' Jamba layers (same shapes).

Where `launch/bench.py` measures whole training steps, this splits a step into its parts so a change to
one module can be measured alone: the Mamba mixer, attention, MoE and dense MLP blocks, the RMSNorm and
the loss, each timed forward + backward on random bf16 inputs (median of `--iters`, CUDA events).

    python -m launch.bench_ops --preset bench-3b --batch 4 --seq 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from jamba.config import get_preset


def time_fwd_bwd(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iters: int, warmup: int = 2,
                 device: torch.device = torch.device("cuda")) -> float:
    """Median ms of forward + backward (grad of a random cotangent), grads cleared between iterations."""
    def once():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.randn_like(out) if out.dim() else None)
        for p in params:
            p.grad = None

    return median_ms(once, iters, warmup, device)


def median_ms(once: Callable[[], None], iters: int, warmup: int = 2,
              device: torch.device = torch.device("cuda")) -> float:
    """Median ms of `once()` over `iters` calls after `warmup` (CUDA events on CUDA, wall clock otherwise)."""
    for _ in range(warmup):
        once()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            once()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time
            t = time.perf_counter()
            once()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def module_cases(cfg, B: int, L: int, device, dtype) -> Dict[str, Callable[[], tuple]]:
    """name -> builder returning (callable, params) for each of our modules and HF's counterparts."""
    from jamba.hf import config_to_hf

    H = cfg.hidden_size

    def inp():
        return torch.randn(B, L, H, device=device, dtype=dtype, requires_grad=True)

    def ours_mamba():
        from jamba.mamba import Mamba1Mixer
        m = Mamba1Mixer(cfg, 0).to(device, dtype)
        x = inp()
        return (lambda: m(x)), list(m.parameters()) + [x]

    def ours_attn():
        from jamba.attention import Attention
        m = Attention(cfg, cfg.attn_layer_offset).to(device, dtype)
        x = inp()
        return (lambda: m(x)), list(m.parameters()) + [x]

    def ours_moe():
        from jamba.moe import MoE
        m = MoE(cfg).to(device, dtype)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=cfg.initializer_range)
        x = inp()
        return (lambda: m(x)[0]), list(m.parameters()) + [x]

    def ours_mlp():
        from jamba.layers import MLP
        m = MLP(cfg).to(device, dtype)
        x = inp()
        return (lambda: m(x)), list(m.parameters()) + [x]

    def ours_norm():
        from jamba.layers import RMSNorm
        m = RMSNorm(H, cfg.rms_norm_eps).to(device, dtype)
        x = inp()
        return (lambda: m(x)), list(m.parameters()) + [x]

    def eager_norm():
        from jamba import layers
        m = layers.RMSNorm(H, cfg.rms_norm_eps).to(device, dtype)
        x = inp()

        def run():
            old, layers._HAS_RMS_NORM = layers._HAS_RMS_NORM, False
            try:
                return m(x)
            finally:
                layers._HAS_RMS_NORM = old
        return run, list(m.parameters()) + [x]

    def ours_loss():
        from jamba.loss import chunked_cross_entropy
        w = (torch.randn(cfg.vocab_size, H, device=device, dtype=dtype) * 0.02).requires_grad_()
        x = inp()
        y = torch.randint(0, cfg.vocab_size, (B, L), device=device)
        return (lambda: chunked_cross_entropy(x, w, y, chunk_size=cfg.loss_chunk_size)), [w, x]

    hf_cfg = config_to_hf(cfg, use_mamba_kernels=True)
    hf_cfg._attn_implementation = "sdpa"
    if device.type == "cuda":  # what HF's full model picks on CUDA (standalone modules see None = eager)
        hf_cfg._experts_implementation = "grouped_mm"

    def hf_mamba():
        from transformers.models.jamba import modeling_jamba as mj
        m = mj.JambaMambaMixer(hf_cfg, 0).to(device, dtype)
        x = inp()
        return (lambda: m(x)), list(m.parameters()) + [x]

    def hf_moe():
        from transformers.models.jamba import modeling_jamba as mj
        m = mj.JambaSparseMoeBlock(hf_cfg).to(device, dtype)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=cfg.initializer_range)
        x = inp()
        return (lambda: m(x)), list(m.parameters()) + [x]

    def hf_loss():  # what HF's JambaForCausalLM does: full logits, then its loss_function (fp32 upcast)
        import torch.nn.functional as F
        w = (torch.randn(cfg.vocab_size, H, device=device, dtype=dtype) * 0.02).requires_grad_()
        x = inp()
        y = torch.randint(0, cfg.vocab_size, (B, L), device=device)
        return (lambda: F.cross_entropy(F.linear(x, w).float().view(-1, cfg.vocab_size), y.view(-1))), [w, x]

    return {"ours mamba mixer": ours_mamba, "hf   mamba mixer": hf_mamba, "ours attention": ours_attn,
            "ours moe": ours_moe, "hf   moe": hf_moe, "ours mlp": ours_mlp, "ours rmsnorm": ours_norm, "eager rmsnorm": eager_norm,
            "ours loss (chunked CE)": ours_loss, "hf   loss (logits+CE)": hf_loss}


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(prog="python -m launch.bench_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-3b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", default=None, help="comma-separated substrings of case names to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_preset(args.preset)
    rows = []
    print(f"fwd+bwd ms per module, {args.preset}, batch {args.batch} x seq {args.seq}, {dtype}:")
    for name, build in module_cases(cfg, args.batch, args.seq, device, dtype).items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        try:
            fn, params = build()
            ms = time_fwd_bwd(fn, params, args.iters, device=device)
            rows.append({"case": name, "ms": ms})
            print(f"  {name:26s} {ms:9.2f} ms", flush=True)
            del fn, params
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"  {name:26s}   failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
