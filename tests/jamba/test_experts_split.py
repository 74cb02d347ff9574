"""jamba/experts_split.py: GroupedExperts' forward and backward, with the backward split into the input and the
weight gradients, equal autograd's through GroupedExperts; parts whose activations share buffers give the weight
gradients of all their rows at once. Both GEMM paths: torch._grouped_mm (fp32, bf16) and the per-expert loop
(float64, and rows that are not whole 16 bytes)."""

import pytest
import torch

from jamba import experts_split as xs
from jamba.moe import GroupedExperts


def _case(dtype, h=16, i=32, counts=(5, 0, 9, 3), seed=0):
    torch.manual_seed(seed)
    mod = GroupedExperts(len(counts), h, i).to(dtype)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
    c = torch.tensor(counts)
    x = torch.randn(int(c.sum()), h, dtype=dtype)
    dy = torch.randn_like(x)
    return mod, c, x, dy


def _autograd(mod, c, x, dy):
    mod.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    y = mod(leaf, c)
    y.backward(dy)
    return y.detach(), leaf.grad, [p.grad for p in mod.parameters()]


def _weights(mod):
    return tuple(p.detach() for p in mod.parameters())


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,h,tol", [(torch.float64, 16, 1e-12), (torch.float32, 16, 1e-5),
                                         (torch.bfloat16, 16, 2e-2), (torch.float32, 6, 1e-5)],
                         ids=["float64-loop", "float32-grouped", "bfloat16-grouped", "float32-loop-unaligned"])
def test_split_backward_equals_autograd(dtype, h, tol):
    mod, c, x, dy = _case(dtype, h=h)
    y_ref, dx_ref, dw_ref = _autograd(mod, c, x, dy)
    w = _weights(mod)
    y, saved = xs.forward(x, c, w)
    dx, dg, du = xs.input_grad(saved, dy, w)
    dw = xs.weight_grad(x, saved.h, dy, dg, du, c)
    assert y.dtype == dtype and dx.dtype == dtype
    assert _rel(y, y_ref) < tol and _rel(dx, dx_ref) < tol
    for name, a, b in zip(("gate", "up", "down"), dw, dw_ref):
        assert a.shape == b.shape and _rel(a, b) < tol, name
    assert dw[0][1].abs().max() == 0  # expert 1 got no rows: a zero gradient


def test_uses_grouped_mm_only_where_it_can():
    f32, f64 = torch.zeros(4, 16), torch.zeros(4, 16, dtype=torch.float64)
    assert xs._grouped_ok(f32, torch.zeros(2, 16, 8)) and not xs._grouped_ok(f64, f64.view(1, 4, 16))
    assert not xs._grouped_ok(torch.zeros(4, 6), torch.zeros(2, 6, 8))  # 24-byte rows


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_parts_sharing_buffers_give_all_rows_weight_gradients_at_once(dtype, tol):
    """Two parts of the same rows (the first 7, the rest; expert 2's rows straddle the cut), each writing h, dg,
    du into its slice of one buffer: one weight-gradient call over the buffers equals autograd over all rows."""
    mod, c, x, dy = _case(dtype)
    _, dx_ref, dw_ref = _autograd(mod, c, x, dy)
    w = _weights(mod)
    a = 7
    c1 = torch.tensor([5, 0, 2, 0])
    c2 = c - c1
    n, i = x.shape[0], w[0].shape[1]
    h_buf, dg_buf, du_buf = (x.new_empty(n, i) for _ in range(3))
    _, s1 = xs.forward(x[:a], c1, w, h_out=h_buf[:a])
    _, s2 = xs.forward(x[a:], c2, w, h_out=h_buf[a:])
    d2, _, _ = xs.input_grad(s2, dy[a:], w, dg_out=dg_buf[a:], du_out=du_buf[a:])
    d1, _, _ = xs.input_grad(s1, dy[:a], w, dg_out=dg_buf[:a], du_out=du_buf[:a])
    assert _rel(torch.cat([d1, d2]), dx_ref) < tol
    for a_, b_ in zip(xs.weight_grad(x, h_buf, dy, dg_buf, du_buf, c), dw_ref):
        assert _rel(a_, b_) < tol


def test_a_part_without_rows():
    mod, c, x, dy = _case(torch.float32, counts=(0, 0, 0, 0))
    w = _weights(mod)
    y, saved = xs.forward(x, c, w)
    dx, dg, du = xs.input_grad(saved, dy, w)
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    dw = xs.weight_grad(x, saved.h, dy, dg, du, c)
    assert [t.shape for t in dw] == [p.shape for p in mod.parameters()] and all(t.abs().max() == 0 for t in dw)


def test_the_loop_reads_the_counts_once_per_part(monkeypatch):
    """The per-expert loop (float64 here) reads the counts on the host in the forward only; the part's input
    gradient and, given the ends, its weight gradient reuse them; a weight gradient over no rows reads nothing."""
    mod, c, x, dy = _case(torch.float64)
    w = _weights(mod)
    _, saved = xs.forward(x, c, w)
    assert saved.ends == torch.cumsum(c, 0).tolist()

    def no_sync(self):
        raise AssertionError("a host read of the counts")
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    dx, dg, du = xs.input_grad(saved, dy, w)
    xs.weight_grad(x, saved.h, dy, dg, du, c, saved.ends)
    empty = x[:0]
    dw = xs.weight_grad(empty, empty.new_empty(0, 32), empty, dg[:0], du[:0], torch.zeros_like(c))
    assert all(t.abs().max() == 0 for t in dw)
