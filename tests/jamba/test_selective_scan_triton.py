"""The Triton selective scan (jamba/ops/selective_scan_triton.py) against the sequential reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which must be set before Triton
compiles anything, so in a subprocess); on CUDA they run compiled, in bf16, against the fp32 reference
and against mamba-ssm's kernel.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jamba.ops import kernels

ROOT = Path(__file__).resolve().parents[2]

# (batch, dim, L, N, tile "BD,BL,WARPS", z, D, delta_bias, softplus). The cases cover: L not a multiple of
# the tile (masked tail), L shorter than one tile, dim not a multiple of BD, N not a power of two, several
# tiles carrying state forward and the state gradient backward, and every optional operand absent.
CASES = [
    (2, 8, 37, 16, "4,16,4", True, True, True, True),
    (1, 6, 64, 5, "4,32,4", False, False, False, False),
    (2, 5, 9, 16, "4,16,4", True, False, True, True),
    (1, 8, 70, 4, "8,8,2", False, True, False, True),
]

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    import triton.runtime.interpreter as interp
    # Triton's interpreter turns scalar arguments into 1-element arrays and int() of those fails on
    # NumPy >= 2.4; index through .item() instead (the interpreter re-patches tensors on every launch).
    _orig = interp._patch_lang_tensor
    def _patch(tensor):
        _orig(tensor)
        tensor.__index__ = lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
    interp._patch_lang_tensor = _patch
    from jamba.ops.selective_scan_triton import selective_scan_triton
    from jamba.ops import selective_scan_naive
    res = []
    for bsz, dim, L, N, tile, has_z, has_d, has_b, sp in json.loads(sys.argv[1]):
        os.environ["JAMBA_SCAN_TILE"] = tile
        g = torch.Generator().manual_seed(len(res))
        r = lambda *s: torch.randn(*s, generator=g)
        xb = r(bsz, L, 2 * N)  # B and C as strided views of one tensor, as the mixer passes them
        ins = [r(bsz, dim, L), r(bsz, dim, L) * 0.5, -torch.rand(dim, N, generator=g) * 4 - 0.1,
               xb[..., :N].transpose(1, 2), xb[..., N:].transpose(1, 2),
               r(dim) if has_d else None, r(bsz, dim, L) if has_z else None, r(dim) * 0.3 if has_b else None]
        ours = [t.clone().requires_grad_(True) if t is not None else None for t in ins]
        ref = [t.double().requires_grad_(True) if t is not None else None for t in ins]
        y = selective_scan_triton(*ours, delta_softplus=sp)
        y_ref = selective_scan_naive(*ref, delta_softplus=sp)
        gy = torch.randn(y.shape, generator=g)
        y.backward(gy)
        y_ref.backward(gy.double())
        err = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())
        errs = {"out": err(y, y_ref)}
        errs.update({k: err(a.grad, b.grad) for k, a, b in zip("u delta A B C D z bias".split(), ours, ref)
                     if a is not None})
        res.append(errs)
    print(json.dumps(res))
""")


def test_triton_scan_matches_sequential_reference_in_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    for case, errs in zip(CASES, results):
        # fp32 kernels against the fp64 sequential loop: rounding only
        bad = {k: v for k, v in errs.items() if not v < 1e-5}
        assert not bad, f"case {case}: relative errors {bad}"
    # every gradient of the first case was produced and checked
    assert set(results[0]) == {"out", "u", "delta", "A", "B", "C", "D", "z", "bias"}


def _bf16_inputs(b, d, n, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xb = r(b, L, 2 * n).cuda().bfloat16()
    return dict(u=r(b, d, L).cuda().bfloat16(), delta=(r(b, d, L) * 0.5 - 1).cuda().bfloat16(),
                A=(-torch.rand(d, n, generator=g) * 16).cuda(), B=xb[..., :n].transpose(1, 2),
                C=xb[..., n:].transpose(1, 2), D=r(d).cuda(), z=r(b, d, L).cuda().bfloat16(),
                delta_bias=(r(d) * 0.5 - 3).cuda())


def _run(fn, inputs, gy):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True)
    y.backward(gy)
    return y.detach().float(), {k: v.grad.float() for k, v in leaves.items()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1000, 4096])
def test_triton_scan_bf16_against_fp32_reference_and_mamba_ssm(L):
    """Our bf16 kernels are no further from the fp32 reference than mamba-ssm's bf16 kernel (plus a margin
    for different rounding), and within the bf16 tolerances of tests/jamba/test_ops.py."""
    pytest.importorskip("triton")
    from jamba.ops.selective_scan_triton import selective_scan_triton
    inp = _bf16_inputs(2, 256, 16, L)
    gy = torch.randn(2, 256, L, device="cuda", dtype=torch.bfloat16)
    # the chunked reference computes in fp32 from the same bf16 inputs
    y32, g32 = _run(lambda **kw: kernels.selective_scan(**kw, force_reference=True), inp, gy)
    y, g = _run(selective_scan_triton, inp, gy)
    assert _rel(y, y32) < 2e-2
    for k in g:
        assert _rel(g[k], g32[k]) < 5e-2, (k, _rel(g[k], g32[k]))
    if kernels.kernels_available()["selective_scan"]:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        ym, gm = _run(selective_scan_fn, inp, gy)
        assert _rel(y, y32) <= 1.5 * _rel(ym, y32) + 1e-3
        for k in g:
            assert _rel(g[k], g32[k]) <= 1.5 * _rel(gm[k], g32[k]) + 1e-3, (k, _rel(g[k], g32[k]), _rel(gm[k], g32[k]))
