"""Chunked cross-entropy equals plain F.cross_entropy (value and grads) and never builds (N, V) logits."""

import pytest
import torch
import torch.nn.functional as F

from jamba.loss import chunked_cross_entropy

N, H, V = 50, 16, 37


def make(seed=0, ignore_frac=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, ignore_index=-100)


@pytest.mark.parametrize("impl", ["fused", "checkpoint"])
@pytest.mark.parametrize("chunk", [7, 16, 50, 1000])  # not dividing N, dividing, exactly N, larger than N
def test_value_and_grads_match_plain_ce(impl, chunk):
    h, w, y = make()
    want = reference(h, w, y)
    gh, gw = torch.autograd.grad(want * 1.7, (h, w))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    got = chunked_cross_entropy(h2, w2, y, chunk_size=chunk, impl=impl)
    (got * 1.7).backward()  # a non-unit upstream gradient must be applied
    # fp64 throughout (chunking only reorders sums): agreement to ~1e-12; 1e-9 leaves margin
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(h2.grad, gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w2.grad, gw, rtol=1e-9, atol=1e-12)


def test_batched_shapes_and_fp32():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (2, 9), generator=g)
    y[0, -1] = y[1, -1] = -100
    got = chunked_cross_entropy(h, w, y, chunk_size=4)
    got.backward()
    want = F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten(), ignore_index=-100)
    gh, gw = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)


def test_no_grad_and_all_ignored():
    h, w, y = make()
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, w, y, chunk_size=8).double(),
                                   reference(h, w, y).double(), rtol=1e-6, atol=0)
    y_none = torch.full_like(y, -100)
    assert torch.isnan(chunked_cross_entropy(h, w, y_none, chunk_size=8))  # like F.cross_entropy
    assert torch.isnan(reference(h, w, y_none))


@pytest.mark.parametrize("impl", ["fused", "checkpoint"])
def test_never_materialises_full_logits(impl):
    """No tensor produced by any op (forward or backward, incl. recomputation) has more than `chunk` rows of
    vocabulary width: the largest vocab-wide tensor is (chunk, V)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Spy(TorchDispatchMode):
        rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and V in t.shape:
                    self.rows.append(t.numel() // V)
            return out

    h, w, y = make(dtype=torch.float32)
    with Spy():
        chunked_cross_entropy(h, w, y, chunk_size=8, impl=impl).backward()
    # the weight (V, H) and its gradient have V rows of width H; logits chunks have <= 8 x V elements
    logit_like = [r for r in Spy.rows if r != H]
    assert Spy.rows and max(logit_like) <= 8, sorted(set(Spy.rows))


def test_bf16_close_to_fp32():
    h, w, y = make(dtype=torch.float32)
    want = reference(h, w, y)
    got = chunked_cross_entropy(h.detach().bfloat16().requires_grad_(), w.detach().bfloat16(), y, chunk_size=8)
    # bf16 logits (8-bit mantissa) on |logits| ~ 5: the mean CE moves by ~1e-2 at most
    assert abs(got.item() - want.item()) < 3e-2
    assert got.dtype == torch.float32


def test_bad_impl():
    h, w, y = make()
    with pytest.raises(ValueError, match="impl"):
        chunked_cross_entropy(h, w, y, impl="nope")


@pytest.mark.gpu
def test_cuda_bf16_memory_and_value():
    """bf16 on CUDA: the loss agrees with fp32 logits CE, and peak memory stays far below the (N, V) fp32
    logits that a plain implementation holds (here 16384 x 32000 x 4 B = 2.1 GB)."""
    torch.manual_seed(0)
    n, h, v, chunk = 16384, 512, 32000, 1024
    hidden = (torch.randn(n, h, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda") * h ** -0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    full_logits = n * v * 4
    print(f"chunked CE peak extra memory {peak / 1e9:.3f} GB vs full fp32 logits {full_logits / 1e9:.2f} GB")
    # extra = fp32 grad_w (65 MB) + grad_h + one chunk's fp32 logits/probabilities (131 MB each) + bf16 copies
    assert peak < full_logits / 4
    with torch.no_grad():
        want = F.cross_entropy(F.linear(hidden.float(), weight.float()), labels)
    # bf16 logits: |logit| ~ 1, per-logit rounding ~4e-3, averaging over 16k tokens -> ~1e-3 on the mean
    assert abs(loss.item() - want.item()) < 1e-2 * want.item()


def test_chunk_fn_softmax_xent_grad_matches_default_path():
    """The element-wise chunk function (what apply_compile compiles) gives the default path's loss and grads,
    with ignored labels and a ragged last chunk."""
    from jamba.loss import chunked_cross_entropy, softmax_xent_grad

    torch.manual_seed(0)
    h = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 21, (2, 13))
    y[0, 3] = y[1, -1] = -100
    ref = chunked_cross_entropy(h, w, y, chunk_size=5)
    gref = torch.autograd.grad(ref, [h, w])
    out = chunked_cross_entropy(h, w, y, chunk_size=5, chunk_fn=softmax_xent_grad)
    g = torch.autograd.grad(out, [h, w])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g[0][0, 3].abs().max() == 0  # ignored position: no gradient
