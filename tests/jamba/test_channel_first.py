"""Channel-first projections of the Mamba-1 mixer (jamba/ops/channel_first.py) against the plain
Linear-then-transpose formulas, values and gradients, and the mixer's fast path against its
tensor-subclass fallback."""

import pytest
import torch
import torch.nn.functional as F

from jamba import mamba as mamba_mod
from jamba.config import get_preset
from jamba.mamba import Mamba1Mixer
from jamba.ops.channel_first import channel_first_linear, interleaved_in_proj


def _grads(out_fn, inputs, seed=1):
    """Forward, then backward of a random projection of every output; returns outputs and input grads."""
    outs = out_fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None])
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("bias", [False, True])
def test_interleaved_in_proj_matches_linear_split(bias):
    torch.manual_seed(0)
    B, L, H, D = 3, 11, 8, 5
    h = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * D, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * D, dtype=torch.float64, requires_grad=True) if bias else None

    def ref(h, w, b=None):
        x, z = F.linear(h, w, b).unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, D): rows 2c (x) and 2c+1 (z)
        return x.transpose(1, 2), z.transpose(1, 2)

    ins = (h, w, b) if bias else (h, w)
    (x, z), g = _grads(lambda *a: interleaved_in_proj(*a), ins)
    (xr, zr), gr = _grads(ref, ins)
    assert x.shape == z.shape == (B, D, L) and x.stride(-1) == 1 and z.stride(-1) == 1
    torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, zr, rtol=1e-12, atol=1e-12)
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_interleaved_in_proj_with_one_output_unused():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x, _ = interleaved_in_proj(h, w)
    gh, gw = torch.autograd.grad(x.sum(), [h, w])
    xr = F.linear(h, w)[..., 0::2]
    ghr, gwr = torch.autograd.grad(xr.sum(), [h, w])
    torch.testing.assert_close(gh, ghr)
    torch.testing.assert_close(gw, gwr)
    assert gw[1::2].abs().max() == 0  # the z rows get no gradient


def test_channel_first_linear_matches_linear_transposed():
    torch.manual_seed(0)
    x = torch.randn(3, 9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (y,), g = _grads(channel_first_linear, (x, w))
    (yr,), gr = _grads(lambda x, w: F.linear(x, w).transpose(1, 2), (x, w))
    assert y.shape == (3, 6, 9) and y.is_contiguous()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proj_bias", [False, True])
def test_mamba1_fast_in_proj_equals_subclass_fallback(monkeypatch, proj_bias):
    """The mixer's one-GEMM in_proj path and the path taken for tensor subclasses (tensor parallelism)
    give the same output and gradients."""
    cfg = get_preset("tiny", hidden_size=16, mamba_d_state=4, mamba_dt_rank=3, mamba_proj_bias=proj_bias)
    torch.manual_seed(0)
    mixer = Mamba1Mixer(cfg, 0).double()
    h = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    params = [h, *mixer.parameters()]
    probe = torch.randn(2, 13, 16, dtype=torch.float64)

    def run():
        out = mixer(h)
        return out.detach(), torch.autograd.grad((out * probe).sum(), params)

    fast, gfast = run()
    monkeypatch.setattr(mamba_mod, "_plain", lambda t: False)
    slow, gslow = run()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, r in zip(gfast, gslow):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
