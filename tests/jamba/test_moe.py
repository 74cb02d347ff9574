"""MoE: routing and expert math against a per-token reference, HF's load-balancing loss on the same router
logits, the statistics hook for global (cross-rank) statistics, expert-parallel friendliness, and (GPU)
torch._grouped_mm against the exact loop in bf16."""

import pytest
import torch
import torch.nn.functional as F

from jamba.config import JambaConfig
from jamba.moe import GroupedExperts, MoE, load_balancing_loss, router_z_loss


def small_cfg(**kw):
    base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                layer_pattern="AE AD AE AE", router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    return JambaConfig(**{**base, **kw})


def random_moe(cfg, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 2.0 / cfg.hidden_size ** 0.5)  # decisive routing (no near-ties)
        for p in moe.experts.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return moe


def reference_moe(moe, x, renormalize=False, idx=None):
    """Per token, per chosen expert: SwiGLU of that expert times its routing weight (HF semantics);
    `idx` (N, k) imposes the experts instead of the router's top-k."""
    e = moe.experts
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    w, idx = torch.topk(probs, moe.top_k, dim=-1) if idx is None else (probs.gather(1, idx), idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            k = idx[t, j]
            h = F.silu(e.gate_proj[k] @ x[t]) * (e.up_proj[k] @ x[t])
            out[t] += w[t, j] * (e.down_proj[k] @ h)
    return out


@pytest.mark.parametrize("renormalize,top_k", [(False, 2), (True, 2), (False, 1), (True, 3)])
def test_moe_matches_per_token_reference(renormalize, top_k):
    cfg = small_cfg(moe_renormalize=renormalize, num_experts_per_tok=top_k)
    moe = random_moe(cfg).double()
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    out, stats = moe(x)
    want = reference_moe(moe, x.view(-1, cfg.hidden_size), renormalize).view_as(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    counts = stats[:cfg.num_experts]
    assert counts.sum().item() == 18 * top_k and stats[-1].item() == 18


def test_moe_gradients_match_reference():
    cfg = small_cfg()
    moe = random_moe(cfg).double()
    x = torch.randn(13, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    out, _ = moe(x.view(1, 13, -1))
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x] + list(moe.parameters()))
    want = torch.autograd.grad((reference_moe(moe, x) * g.view(13, -1)).sum(), [x] + list(moe.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_forced_balance_routes_round_robin_weighted_by_the_router():
    """moe.force_balance (benchmarking): equal counts per expert whatever the router says, outputs weighted by
    the router's probabilities of the imposed experts, and the router still gets a gradient."""
    cfg = small_cfg(moe_force_balance=True)  # 6 experts, top-2: 18 tokens -> 36 copies, 6 per expert
    moe = random_moe(cfg).double()
    with torch.no_grad():
        moe.router.weight[0] += 10.0  # a collapsed router: without forcing, expert 0 would take every token
    x = (torch.randn(18, cfg.hidden_size, dtype=torch.float64) + 1.0).requires_grad_()  # router row 0 wins
    out, stats = moe(x.view(2, 9, -1))
    assert stats[:cfg.num_experts].tolist() == [6.0] * 6
    idx = (torch.arange(36) % 6).view(18, 2)
    torch.testing.assert_close(out.view(18, -1), reference_moe(moe, x, idx=idx), rtol=1e-10, atol=1e-12)
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    normal = random_moe(small_cfg()).double()
    normal.load_state_dict(moe.state_dict())
    assert normal(x.view(2, 9, -1))[1][0].item() == 18  # the same weights, routed by the router: collapsed


def test_expert_bias_steers_the_choice_not_the_weights():
    """moe_router_bias_update_rate > 0: top-k of (probabilities + expert_bias) picks the experts, the unbiased
    probabilities weight them; at zero bias the layer is the plain (HF) one."""
    cfg = small_cfg(moe_router_bias_update_rate=0.01)
    moe = random_moe(cfg).double()
    plain = random_moe(small_cfg()).double()
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if k != "expert_bias"})
    x = torch.randn(18, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(moe(x.view(2, 9, -1))[0], plain(x.view(2, 9, -1))[0], rtol=0, atol=0)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.3, 0.1]))
    out, stats = moe(x.view(2, 9, -1))
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    idx = torch.topk(probs + moe.expert_bias, 2, dim=-1).indices
    assert not torch.equal(idx.sort(-1).values, torch.topk(probs, 2, dim=-1).indices.sort(-1).values)
    torch.testing.assert_close(out.view(18, -1), reference_moe(moe, x, idx=idx), rtol=1e-10, atol=1e-12)
    assert stats[:cfg.num_experts].tolist() == torch.bincount(idx.reshape(-1), minlength=6).double().tolist()


def test_expert_bias_update_evens_out_a_collapsed_router():
    """The DeepSeek-V3 rule: bias += rate * sign(mean - count), kept zero-mean; repeated on a router whose
    logits favour one expert, the loads even out (the router itself is not trained here)."""
    cfg = small_cfg(moe_router_bias_update_rate=0.01)
    moe = random_moe(cfg).double()
    moe.update_expert_bias(torch.tensor([30, 0, 2, 2, 2, 0]), 0.01)
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-5, 1, 1, 1, 1, 1], dtype=torch.float64) / 300)
    moe.reset_parameters()
    assert moe.expert_bias.abs().sum() == 0
    with torch.no_grad():
        moe.router.weight[0] += 0.3  # with the offset inputs below, expert 0 is everybody's first choice
    x = torch.randn(1, 240, cfg.hidden_size, dtype=torch.float64) + 0.5
    with torch.no_grad():
        counts = moe(x)[1][:cfg.num_experts]
        before = (counts / counts.mean()).max().item()
        window = []
        for step in range(600):
            moe.update_expert_bias(counts, 0.003)
            counts = moe(x)[1][:cfg.num_experts]
            window = (window + [counts])[-100:]
    # sign steps leave the loads oscillating around even (more so on 240 tokens than on a real batch): the
    # last 100 steps' mean load is even, and no step is as uneven as the collapsed start
    mean = torch.stack(window).mean(0)
    assert before > 2.5 and (mean / mean.mean()).max() < 1.25, (before, mean)
    assert max((c / c.mean()).max().item() for c in window) < 0.75 * before
    assert abs(moe.expert_bias.sum().item()) < 1e-9


def test_token_chunked_moe_equals_unchunked():
    """moe_token_chunk (long context) changes memory, not math: outputs, statistics (incl. a ragged last
    chunk) and every gradient equal the unchunked layer; the chunk really splits (7 < 2*3 + 7 tokens)."""
    whole = random_moe(small_cfg()).double()
    chunked = random_moe(small_cfg(moe_token_chunk=7)).double()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 10, whole.router.in_features, dtype=torch.float64, requires_grad=True)
    (out_w, st_w), (out_c, st_c) = whole(x), chunked(x)
    torch.testing.assert_close(out_c, out_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st_c, st_w, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out_w)
    loss = lambda out, st: (out * g).sum() + st[6:12].pow(2).sum()  # noqa: E731 - grads through prob sums too
    got = torch.autograd.grad(loss(out_c, st_c), [x] + list(chunked.parameters()))
    want = torch.autograd.grad(loss(out_w, st_w), [x] + list(whole.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_moe_token_chunk_validation():
    with pytest.raises(ValueError, match="moe_token_chunk=0"):
        small_cfg(moe_token_chunk=0)


def test_experts_take_local_count_from_weights():
    """Expert parallelism shards dim 0 and passes counts for the local experts only."""
    torch.manual_seed(0)
    full = GroupedExperts(6, 16, 8)
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    local = GroupedExperts(2, 16, 8)
    with torch.no_grad():
        for p, q in zip(local.parameters(), full.parameters()):
            p.copy_(q[2:4])  # this rank holds experts 2 and 3
    counts = torch.tensor([3, 0, 4, 2, 0, 5])
    x = torch.randn(int(counts.sum()), 16)
    y_full = full(x, counts)
    lo, hi = 3, 3 + 4 + 2
    torch.testing.assert_close(local(x[lo:hi], counts[2:4]), y_full[lo:hi])
    with pytest.raises(ValueError, match="local expert"):
        local(x, counts)


def _model_with_decisive_routers(cfg, seed):
    """A JambaForCausalLM whose routers have large weights (no near-ties in the top-k)."""
    from jamba.model import JambaForCausalLM

    torch.manual_seed(seed)
    model = JambaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.feed_forward, "router"):
                layer.feed_forward.router.weight.normal_(0, 0.5)
    return model


def test_aux_loss_equals_transformers_load_balancing_loss():
    transformers = pytest.importorskip("transformers")
    from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

    cfg = small_cfg()
    model = _model_with_decisive_routers(cfg, seed=0)
    logits = []
    hooks = [l.feed_forward.router.register_forward_hook(lambda m, i, o: logits.append(o))
             for l in model.model.layers if hasattr(l.feed_forward, "router")]
    x = torch.randint(0, cfg.vocab_size, (3, 11))
    out = model(x, labels=x)
    for h in hooks:
        h.remove()
    want = load_balancing_loss_func(tuple(logits), cfg.num_experts, cfg.num_experts_per_tok)
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-6, atol=0)
    z = torch.logsumexp(torch.cat(logits).float(), dim=-1).pow(2).mean()
    torch.testing.assert_close(out.z_loss, z, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss)
    # expert_counts: top-k assignments per MoE layer
    want_counts = torch.stack([torch.bincount(torch.topk(l, 2, dim=-1).indices.flatten(), minlength=6)
                               for l in logits])
    assert out.expert_counts.dtype == torch.long and torch.equal(out.expert_counts, want_counts)
    assert not out.expert_counts.requires_grad


def test_moe_stats_reduce_gives_global_statistics():
    """A hook that adds another rank's statistics (what a sum all-reduce does) makes the aux / z losses
    those of the union of both batches, as HF's formula on the concatenated router logits."""
    from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

    cfg = small_cfg()
    model = _model_with_decisive_routers(cfg, seed=1)
    xa, xb = torch.randint(0, cfg.vocab_size, (2, 2, 7))
    captured = {}
    model.moe_stats_reduce = lambda s: captured.setdefault("b", s.detach().clone())
    model(xb)  # "rank 1" statistics
    seen = []
    model.moe_stats_reduce = lambda s: (seen.append(s.shape), s + captured["b"])[1]
    out = model(xa)
    assert seen == [(3, 2 * cfg.num_experts + 2)]
    model.moe_stats_reduce = None
    both = model(torch.cat([xa, xb]))
    torch.testing.assert_close(out.aux_loss, both.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.z_loss, both.z_loss, rtol=1e-6, atol=0)
    assert torch.equal(out.expert_counts, both.expert_counts)
    # ... which is HF's function on the router logits of the union batch
    logits = []
    hooks = [l.feed_forward.router.register_forward_hook(lambda m, i, o: logits.append(o))
             for l in model.model.layers if hasattr(l.feed_forward, "router")]
    model(torch.cat([xa, xb]))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out.aux_loss, load_balancing_loss_func(tuple(logits), 6, 2), rtol=1e-6, atol=0)


def test_loss_formulas_on_constructed_stats():
    # E=2, one layer, 4 tokens, top-1: counts [3, 1], prob sums [2.5, 1.5] -> 2 * (3/4*2.5/4 + 1/4*1.5/4)
    s = torch.tensor([[3.0, 1.0, 2.5, 1.5, 8.0, 4.0]])
    torch.testing.assert_close(load_balancing_loss(s, 2), torch.tensor(2 * (0.75 * 0.625 + 0.25 * 0.375)))
    torch.testing.assert_close(router_z_loss(s, 2), torch.tensor(2.0))


@pytest.mark.gpu
def test_grouped_mm_matches_loop_bf16():
    """torch._grouped_mm vs the per-expert loop on the same bf16 inputs, forward and backward.
    Both use bf16 operands with fp32 accumulation; they differ by the accumulation order/tiling and by where
    intermediate results are rounded to bf16, so we expect a few bf16 ulps (eps 2^-8 = 3.9e-3) relative to
    the tensor's scale: 2e-2 of max |ref| leaves ~5x margin."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    torch.manual_seed(0)
    E, H, I = 8, 256, 512
    ex = GroupedExperts(E, H, I).cuda()
    for p in ex.parameters():
        torch.nn.init.normal_(p, 0, H ** -0.5)
    ex = ex.bfloat16()
    counts = torch.tensor([37, 0, 128, 5, 64, 1, 300, 17], device="cuda")  # uneven, incl. empty / unaligned
    x = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        ex.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_()
        y = fn(xx, counts)
        y.backward(gy)
        return [y.float(), xx.grad.float()] + [p.grad.float() for p in ex.parameters()]

    calls = []
    orig = torch._grouped_mm

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    torch._grouped_mm = spy
    try:
        fast = run(ex.forward)  # dispatches to _grouped_mm on CUDA/bf16
    finally:
        torch._grouped_mm = orig
    assert len(calls) == 3, "forward must use torch._grouped_mm on CUDA/bf16"
    ref = run(ex._loop)
    ex32 = ex.float()
    exact = run(lambda xx, c: ex32._loop(xx.float(), c))  # fp32 math on the same bf16-valued inputs
    ex.bfloat16()
    for name, a, b, c in zip(["out", "dx", "d_gate", "d_up", "d_down"], fast, ref, exact):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        err32 = ((a - c).abs().max() / c.abs().max().clamp_min(1e-6)).item()
        print(f"grouped_mm vs loop {name}: max rel err {err:.2e}; vs fp32 {err32:.2e}")
        assert err < 2e-2 and err32 < 2e-2, f"{name}: {err:.2e} / {err32:.2e}"
    # empty experts get exactly zero weight gradients
    assert fast[2][1].abs().max().item() == 0.0


@pytest.mark.gpu
def test_moe_cuda_bf16_close_to_cpu_fp32():
    cfg = small_cfg(hidden_size=128, intermediate_size=256, num_experts=8)
    moe = random_moe(cfg)
    x = torch.randn(4, 64, 128)
    want, st_want = moe(x)
    got, st_got = moe.cuda().bfloat16()(x.cuda().bfloat16())
    # bf16 weights/activations through a 2-matmul chain: ~1e-2 relative per element. A token whose top-k set
    # flips under bf16 router logits (near-ties) differs by O(1), so compare in the Frobenius norm, where a
    # few flipped tokens out of 256 stay below the bound, and check that routing mostly agrees.
    err = ((got.float().cpu() - want).norm() / want.norm()).item()
    agree = (st_got[:8].cpu() - st_want[:8]).abs().sum().item() / st_want[:8].sum().item()
    print(f"MoE cuda bf16 vs cpu fp32: norm rel err {err:.2e}, routing count mismatch {agree:.2%}")
    assert err < 5e-2 and agree < 0.05


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_gather_rows_matches_index_select(fold):
    """gather_rows' gather-based backward equals index_select's scatter-add backward."""
    from jamba.moe import gather_rows

    torch.manual_seed(0)
    S, H = 7, 5
    src = torch.randn(S, H, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(S * fold)  # output position p copies source row order[p] // fold
    index = order // fold
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(S * fold))
    probe = torch.randn(S * fold, H, dtype=torch.float64)
    out = gather_rows(src, index, inverse, fold=fold)
    (g,) = torch.autograd.grad((out * probe).sum(), src)
    ref = src.index_select(0, index)
    (gr,) = torch.autograd.grad((ref * probe).sum(), src)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_experts_with_no_rows(device):
    """An expert-parallel rank may receive no tokens: the experts return (0, H) and every weight gets a zero
    gradient (torch._grouped_mm's backward rejects an empty input, so the CUDA bf16 path must not take it)."""
    ex = GroupedExperts(4, 16, 32).to(device)
    for p in ex.parameters():
        torch.nn.init.normal_(p)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ex = ex.to(dtype)
    x = torch.zeros(0, 16, device=device, dtype=dtype, requires_grad=True)
    y = ex(x, torch.zeros(4, dtype=torch.long, device=device))
    assert y.shape == (0, 16)
    (y.sum() + 0.0).backward()
    for name, p in ex.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 0, 0]], ids=["some", "none"])
def test_experts_skip_padding_rows(device, counts):
    """padded=True (EP's fixed-size exchange): rows after the counted ones give zero output and no gradient,
    the counted rows exactly what they give without padding (on CUDA bf16 through torch._grouped_mm, whose
    output rows past the last offset are left unwritten), and the weights the same gradients. Even when
    nothing is counted (an EP rank that received only padding). Without padded=True, extra rows are an error."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    ex = GroupedExperts(4, 16, 32).to(device, dtype)
    for p in ex.parameters():
        torch.nn.init.normal_(p, 0, 0.25)
    c = torch.tensor(counts, device=device)
    n, pad = sum(counts), 7
    x = torch.randn(n + pad, 16, device=device, dtype=dtype)
    gy = torch.randn(n + pad, 16, device=device, dtype=dtype)

    def run(rows, padded):
        ex.zero_grad(set_to_none=True)
        xx = x[:rows].detach().clone().requires_grad_()
        y = ex(xx, c, padded=padded)
        y.backward(gy[:rows])
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ex.parameters()]
        return y.detach(), xx.grad, grads

    y, dx, dw = run(n + pad, True)
    y0, dx0, dw0 = run(n, False) if n else (y[:0], dx[:0], [torch.zeros_like(p) for p in ex.parameters()])
    assert torch.equal(y[n:], torch.zeros_like(y[n:])) and torch.equal(y[:n], y0)
    assert torch.equal(dx[n:], torch.zeros_like(dx[n:])) and torch.equal(dx[:n], dx0)
    for a, b in zip(dw, dw0):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="padded=True"):
        ex._loop(x, c)  # the exact loop refuses uncounted rows unless told they are padding
