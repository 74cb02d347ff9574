"""Our CUDA selective scan (jamba/ops/csrc/selective_scan.cu) against the sequential reference and mamba-ssm.

GPU only: the kernel is compiled on first use (nvcc). fp32 runs are compared with the fp64 sequential loop
(rounding only); bf16 runs with the fp32 reference, next to mamba-ssm's bf16 error on the same inputs.
"""

import pytest
import torch

from jamba.ops import kernels, selective_scan_naive

pytestmark = pytest.mark.gpu

# (batch, dim, L, z, D, delta_bias, softplus, strided B/C, steps between stored states). L covers: shorter than
# a tile, a tile tail, several chunks with a tail, and an exact multiple of the chunk; the state interval
# covers one tile (the backward's per-tile kernel: no recomputation), a few tiles, and the longest (256).
CASES = [
    (2, 16, 37, True, True, True, True, True, 16),
    (1, 8, 300, False, False, False, False, False, 256),
    (2, 24, 513, True, False, True, True, True, 256),
    (2, 24, 513, True, False, True, True, True, 48),
    (2, 24, 513, True, True, True, True, True, 16),
    (1, 32, 1024, True, True, False, True, False, 16),
]


def _cuda_scan():
    from jamba.ops import selective_scan_cuda as sc
    if sc.extension() is None:
        pytest.fail(f"the CUDA scan did not build: {sc.build_error()}")
    return sc


def _inputs(b, d, L, has_z, has_d, has_bias, strided, dtype, seed=0, softplus=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if strided:  # B and C as strided views of one (batch, L, 2N) tensor, as the mixer passes them
        xb = r(b, L, 32).cuda().to(dtype)
        B, C = xb[..., :16].transpose(1, 2), xb[..., 16:].transpose(1, 2)
    else:
        B, C = r(b, 16, L).cuda().to(dtype), r(b, 16, L).cuda().to(dtype)
    # without softplus, delta is the step itself and must be positive (a negative step grows the state)
    delta = r(b, d, L) * 0.5 - 1 if softplus else torch.rand(b, d, L, generator=g) * 0.2
    return dict(u=r(b, d, L).cuda().to(dtype), delta=delta.cuda().to(dtype),
                A=(-torch.rand(d, 16, generator=g) * 8 - 0.05).cuda(), B=B, C=C,
                D=r(d).cuda() if has_d else None, z=r(b, d, L).cuda().to(dtype) if has_z else None,
                delta_bias=(r(d) * 0.5 - 2).cuda() if has_bias else None)


def _run(fn, inputs, gy, softplus, cast=None):
    leaves = {k: (v.detach().to(cast) if cast and v.is_floating_point() else v.detach()).clone().requires_grad_(True)
              if v is not None else None for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus)
    y.backward(gy.to(y.dtype))
    return y.detach().double(), {k: v.grad.double() for k, v in leaves.items() if v is not None}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES)
def test_cuda_scan_fp32_matches_sequential_loop(case):
    sc = _cuda_scan()
    b, d, L, has_z, has_d, has_bias, softplus, strided, every = case
    inp = _inputs(b, d, L, has_z, has_d, has_bias, strided, torch.float32, softplus=softplus)
    gy = torch.randn(b, d, L, device="cuda")
    y, g = _run(lambda **kw: sc.selective_scan_cuda(**kw, state_every=every), inp, gy, softplus)
    y_ref, g_ref = _run(selective_scan_naive, inp, gy, softplus, cast=torch.float64)
    assert _rel(y, y_ref) < 1e-4
    assert set(g) == set(g_ref) and len(g) == 5 + has_z + has_d + has_bias
    for k in g:
        assert _rel(g[k], g_ref[k]) < 1e-4, (k, _rel(g[k], g_ref[k]))


@pytest.mark.parametrize("L", [1000, 4096])
def test_cuda_scan_bf16_against_fp32_reference_and_mamba_ssm(L):
    sc = _cuda_scan()
    inp = _inputs(2, 256, L, True, True, True, True, torch.bfloat16)
    gy = torch.randn(2, 256, L, device="cuda", dtype=torch.bfloat16)
    y32, g32 = _run(lambda **kw: kernels.selective_scan(**kw, force_reference=True), inp, gy, True)
    y, g = _run(sc.selective_scan_cuda, inp, gy, True)
    assert _rel(y, y32) < 2e-2
    for k in g:
        assert _rel(g[k], g32[k]) < 5e-2, (k, _rel(g[k], g32[k]))
    if kernels.kernels_available()["selective_scan"]:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        ym, gm = _run(selective_scan_fn, inp, gy, True)
        assert _rel(y, y32) <= 1.5 * _rel(ym, y32) + 1e-3
        for k in g:
            assert _rel(g[k], g32[k]) <= 1.5 * _rel(gm[k], g32[k]) + 1e-3, (k, _rel(g[k], g32[k]), _rel(gm[k], g32[k]))


def test_cuda_scan_custom_ops_and_compile_without_graph_break():
    sc = _cuda_scan()
    inp = _inputs(2, 16, 300, True, True, True, True, torch.float32)
    args = (inp["u"], inp["delta"], inp["A"], inp["B"].contiguous(), inp["C"].contiguous(), inp["D"], inp["z"],
            inp["delta_bias"], True, 32)
    torch.library.opcheck(sc._scan_fwd, args)
    gy = torch.randn(2, 16, 300, device="cuda")
    eager_y, eager_g = _run(sc.selective_scan_cuda, inp, gy, True)
    compiled = torch.compile(sc.selective_scan_cuda, fullgraph=True, backend="aot_eager")
    y, g = _run(compiled, inp, gy, True)
    assert torch.equal(y, eager_y)
    for k in g:
        assert torch.equal(g[k], eager_g[k]), k
