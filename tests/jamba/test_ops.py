"""Mamba ops: the chunked references against naive sequential loops (fp64, forward and gradients),
the dispatch, and (GPU) the CUDA/Triton kernels against the references."""

import logging

import pytest
import torch
import torch.nn.functional as F

from jamba.ops import causal_conv1d_ref, kernels, selective_scan_naive, selective_scan_ref, ssd_chunked_ref, ssd_naive

f64 = torch.float64


def _scan_inputs(b=2, d=5, n=4, L=37, dtype=f64, device="cpu", dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    t = dict(u=r(b, d, L), delta=dt_scale * r(b, d, L), A=-torch.exp(r(d, n)), B=r(b, n, L), C=r(b, n, L),
             D=r(d), z=r(b, d, L), delta_bias=r(d))
    return {k: v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z") else torch.float32
                     if dtype != f64 else f64).requires_grad_(True) for k, v in t.items()}


def _grads(fn, inputs, **kw):
    out = fn(**inputs, **kw)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=f64).to(out)
    grads = torch.autograd.grad(out, list(inputs.values()), gy)
    return out, dict(zip(inputs, grads))


@pytest.mark.parametrize("L,chunk", [(37, None), (37, 5), (64, 8), (1, None), (50, 64)])
def test_selective_scan_ref_matches_naive_fwd_bwd(L, chunk):
    inp = _scan_inputs(L=L)
    y, g = _grads(selective_scan_ref, inp, delta_softplus=True, chunk_size=chunk)
    y0, g0 = _grads(selective_scan_naive, inp, delta_softplus=True)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


def test_selective_scan_ref_optional_args_and_last_state():
    inp = _scan_inputs(L=29)
    base = {k: inp[k] for k in ("u", "delta", "A", "B", "C")}
    y, s = selective_scan_ref(**base, return_last_state=True, chunk_size=4)
    y0, s0 = selective_scan_naive(**base, return_last_state=True)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s0, rtol=1e-10, atol=1e-10)


def test_selective_scan_ref_stable_with_strong_decay_fp32():
    # delta up to ~60 and |A| up to ~e^3: per-step log decays of -1000 would overflow any exp(-cumsum)
    # formulation in fp32; the chunked reference only forms products of decays <= 1.
    inp = {k: v.detach().float() for k, v in _scan_inputs(L=200, dt_scale=20.0).items()}
    inp64 = {k: v.double() for k, v in inp.items()}
    y = selective_scan_ref(**inp, delta_softplus=True, chunk_size=64)
    y0 = selective_scan_naive(**inp64, delta_softplus=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y0, rtol=1e-4, atol=1e-4)


def test_causal_conv1d_ref_matches_loop():
    torch.manual_seed(0)
    b, d, L, k = 2, 6, 19, 4
    x, w, bias = torch.randn(b, d, L, dtype=f64), torch.randn(d, k, dtype=f64), torch.randn(d, dtype=f64)
    xp = F.pad(x, (k - 1, 0))
    ref = torch.stack([(xp[:, :, t:t + k] * w).sum(-1) + bias for t in range(L)], dim=-1)
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias, activation=None), ref)
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias, activation="silu"), F.silu(ref))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(x, w, bias, activation="relu")


def _ssd_inputs(b=2, L=45, h=4, p=3, g=2, n=5, dtype=f64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=f64)  # noqa: E731
    t = dict(x=r(b, L, h, p), dt=r(b, L, h), A=-torch.exp(r(h)), B=r(b, L, g, n), C=r(b, L, g, n), D=r(h),
             z=r(b, L, h, p), dt_bias=r(h))
    low = {"x", "dt", "B", "C", "z"}
    return {k: v.to(device=device, dtype=dtype if (k in low or dtype == f64) else torch.float32).requires_grad_(True)
            for k, v in t.items()}


@pytest.mark.parametrize("L,chunk,g", [(45, 8, 2), (45, 64, 1), (32, 16, 4), (1, 8, 2)])
def test_ssd_chunked_ref_matches_naive_fwd_bwd(L, chunk, g):
    inp = _ssd_inputs(L=L, g=g)
    y, gr = _grads(lambda **kw: ssd_chunked_ref(chunk_size=chunk, **kw), inp, dt_softplus=True)
    y0, gr0 = _grads(ssd_naive, inp, dt_softplus=True)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    for k in gr0:
        torch.testing.assert_close(gr[k], gr0[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


def test_ssd_chunked_ref_final_state_and_per_channel_D():
    inp = {k: v.detach() for k, v in _ssd_inputs(L=30).items()}
    inp["D"] = torch.randn(4, 3, dtype=f64)
    y, s = ssd_chunked_ref(**inp, chunk_size=7, dt_softplus=True, return_final_states=True)
    y0, s0 = ssd_naive(**inp, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(s, s0)


def test_dispatch_uses_reference_on_cpu_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(kernels._log_once, "seen", set())
    inp = {k: v.detach().float() for k, v in _scan_inputs(L=12).items()}
    with caplog.at_level(logging.INFO, logger="jamba.ops.kernels"):
        y = kernels.selective_scan(**inp, delta_softplus=True)
        kernels.selective_scan(**inp, delta_softplus=True)
    torch.testing.assert_close(y, selective_scan_ref(**inp, delta_softplus=True))
    msgs = [r.getMessage() for r in caplog.records if "selective_scan" in r.getMessage()]
    assert len(msgs) == 1 and "reference" in msgs[0]
    monkeypatch.setenv("JAMBA_FORCE_REFERENCE", "1")
    assert kernels.reference_forced()


def test_scan_kernel_choice_and_clear_errors(monkeypatch):
    u, A, B = torch.randn(1, 8, 32), -torch.rand(8, 16), torch.randn(1, 16, 32)
    monkeypatch.setenv("JAMBA_SCAN_KERNEL", "fastest")
    with pytest.raises(ValueError, match="JAMBA_SCAN_KERNEL='fastest'.*auto, jamba, mamba"):
        kernels.scan_kernel_choice()
    monkeypatch.setenv("JAMBA_SCAN_KERNEL", "Mamba")
    assert kernels.scan_kernel_choice() == "mamba"
    # our kernel does not apply to CPU tensors: auto and mamba quietly pass, an explicit request says why
    assert not kernels._use_jamba_scan(u, A, B, "auto") and not kernels._use_jamba_scan(u, A, B, "mamba")
    with pytest.raises(ValueError, match=r"needs CUDA tensors, d_state 16.*on cpu.*JAMBA_SCAN_KERNEL=auto"):
        kernels._use_jamba_scan(u, A, B, "jamba")


# ---------------------------------------------------------------------------------------------------
# GPU: kernels against the references, bf16 inputs. The kernels keep bf16 I/O and accumulate in fp32;
# the references upcast the same bf16 inputs to fp32. The difference is then dominated by rounding the
# outputs (and the kernels' intermediate bf16 stores) to bf16, relative 2^-8 ~ 4e-3 per rounding, grown
# by reductions over L and N in the gradients; we check max|kernel - ref| <= tol * max|ref| with tol
# 2e-2 for outputs and 5e-2 for gradients (mamba-ssm's own tests use 3e-3 / 5e-3 elementwise plus
# atol for bf16 outputs and looser for gradients).

def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _compare(kernel_fn, ref_fn, inputs, out_tol=2e-2, grad_tol=5e-2):
    ins_k = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    ins_r = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    yk, yr = kernel_fn(**ins_k), ref_fn(**ins_r)
    assert yk.dtype == yr.dtype
    print(f"\noutput rel err {_rel_err(yk, yr):.2e}", end="")
    assert _rel_err(yk, yr) < out_tol, f"output rel err {_rel_err(yk, yr)}"
    gy = torch.randn_like(yk)
    yk.backward(gy)
    yr.backward(gy)
    for k in ins_k:
        if ins_k[k].grad is not None:
            err = _rel_err(ins_k[k].grad, ins_r[k].grad)
            print(f"; grad {k} {err:.2e}", end="")
            assert err < grad_tol, f"grad {k} rel err {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["jamba", "mamba"])
def test_selective_scan_kernel_matches_ref_bf16(impl, monkeypatch):
    monkeypatch.setenv("JAMBA_SCAN_KERNEL", impl)
    if impl == "mamba" and not kernels.kernels_available()["selective_scan"]:
        pytest.skip("mamba_ssm not importable")
    torch.manual_seed(0)
    b, d, n, L = 2, 256, 16, 1024
    inp = dict(u=torch.randn(b, d, L), delta=torch.randn(b, d, L) * 0.5 - 3, A=-torch.rand(d, n) * 16,
               B=torch.randn(b, n, L), C=torch.randn(b, n, L), D=torch.randn(d), z=torch.randn(b, d, L),
               delta_bias=torch.randn(d) * 0.1)
    inp = {k: v.cuda().to(torch.bfloat16 if k in ("u", "delta", "B", "C", "z") else torch.float32)
           for k, v in inp.items()}
    _compare(lambda **kw: kernels.selective_scan(**kw, delta_softplus=True),
             lambda **kw: kernels.selective_scan(**kw, delta_softplus=True, force_reference=True), inp)


@pytest.mark.gpu
def test_causal_conv1d_kernel_matches_ref_bf16():
    if not kernels.kernels_available()["causal_conv1d"]:
        pytest.skip("causal_conv1d not importable")
    torch.manual_seed(0)
    inp = dict(x=torch.randn(2, 256, 1000), weight=torch.randn(256, 4) * 0.5, bias=torch.randn(256))
    inp = {k: v.cuda().bfloat16() for k, v in inp.items()}
    _compare(lambda **kw: kernels.causal_conv1d(**kw), lambda **kw: kernels.causal_conv1d(**kw, force_reference=True),
             inp)


@pytest.mark.gpu
def test_ssd_kernel_matches_ref_bf16():
    if not kernels.kernels_available()["ssd"]:
        pytest.skip("mamba_ssm Triton SSD not importable")
    torch.manual_seed(0)
    b, L, h, p, g, n = 2, 1000, 8, 64, 2, 64
    inp = dict(x=torch.randn(b, L, h, p), dt=torch.randn(b, L, h) * 0.5 - 3, A=-torch.rand(h) * 15 - 1,
               B=torch.randn(b, L, g, n), C=torch.randn(b, L, g, n), D=torch.randn(h),
               z=torch.randn(b, L, h, p), dt_bias=torch.randn(h) * 0.1)
    inp = {k: v.cuda().to(torch.bfloat16 if k in ("x", "dt", "B", "C", "z") else torch.float32)
           for k, v in inp.items()}
    _compare(lambda **kw: kernels.ssd_scan(**kw, chunk_size=256, dt_softplus=True),
             lambda **kw: kernels.ssd_scan(**kw, chunk_size=256, dt_softplus=True, force_reference=True), inp)


def test_cuda_scan_op_checks_what_its_cpp_side_does_not():
    """Called directly (not through selective_scan_cuda, which converts them), the op rejects a D or
    delta_bias of the wrong dtype or shape by name, before reaching the extension; without the extension
    it says why."""
    from jamba.ops import selective_scan_cuda as sc
    u, A, B = torch.randn(1, 8, 32), -torch.rand(8, 16), torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match=r"D must be a contiguous fp32 \(8,\) tensor.*torch.float64"):
        torch.ops.jamba.selective_scan_fwd(u, u, A, B, B, torch.ones(8, dtype=f64), None, None, True, 256)
    with pytest.raises(ValueError, match=r"delta_bias must be .*\(7,\)"):
        torch.ops.jamba.selective_scan_fwd(u, u, A, B, B, None, None, torch.ones(7), True, 256)
    if sc.extension() is None:  # CPU-only machine
        with pytest.raises(RuntimeError, match="extension is not available"):
            torch.ops.jamba.selective_scan_fwd(u, u, A, B, B, torch.ones(8), None, torch.ones(8), True, 256)


def test_scan_state_interval_policy_and_override(monkeypatch):
    """A state per tile while it takes at most 1 GiB (fp32, batch x d_inner x padded seq), else one per 256
    steps; JAMBA_SCAN_STATE_EVERY forces one and rejects what the kernel cannot take, naming the value."""
    from jamba.ops import selective_scan_cuda as sc
    monkeypatch.delenv("JAMBA_SCAN_STATE_EVERY", raising=False)
    shaped = lambda *s: torch.empty(1, device="meta").expand(*s)  # noqa: E731 - a shape, no memory
    assert sc.state_interval(shaped(1, 4096, 65536)) == 16  # exactly 1 GiB
    assert sc.state_interval(shaped(1, 4096, 65537)) == 256  # padded to a whole tile: over
    assert sc.state_interval(shaped(4, 4096, 4096)) == 16
    assert sc.state_interval(shaped(1, 8192, 262144)) == 256
    monkeypatch.setenv("JAMBA_SCAN_STATE_EVERY", "64")
    assert sc.state_interval(shaped(1, 8, 32)) == 64
    for bad in ("0", "24", "512", "often"):
        monkeypatch.setenv("JAMBA_SCAN_STATE_EVERY", bad)
        with pytest.raises(ValueError, match=f"JAMBA_SCAN_STATE_EVERY='{bad}': expected auto or a multiple of 16"):
            sc.state_interval(shaped(1, 8, 32))
