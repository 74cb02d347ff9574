"""Mamba mixers: parity with transformers' JambaMambaMixer, init rules, Mamba-2 against a naive loop,
and (GPU) kernel path against the reference path."""

import math

import pytest
import torch
import torch.nn.functional as F

from jamba.config import get_preset
from jamba.mamba import Mamba1Mixer, Mamba2Mixer
from jamba.ops import causal_conv1d_ref, kernels, ssd_naive



def _cfg(**kw):
    base = dict(hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=6)
    base.update(kw)
    return get_preset("tiny", **base)


def _hf_mixer(cfg):
    from transformers import JambaConfig as HFJambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    hcfg = HFJambaConfig(hidden_size=cfg.hidden_size, mamba_d_state=cfg.mamba_d_state,
                         mamba_d_conv=cfg.mamba_d_conv, mamba_expand=cfg.mamba_expand,
                         mamba_dt_rank=cfg.dt_rank, mamba_conv_bias=cfg.mamba_conv_bias,
                         mamba_proj_bias=cfg.mamba_proj_bias, rms_norm_eps=cfg.rms_norm_eps,
                         num_hidden_layers=1, attn_layer_period=2, attn_layer_offset=1,
                         num_experts=1, vocab_size=16)
    return JambaMambaMixer(hcfg, layer_idx=0)


def _load_into_hf(ours, hf):
    """Copy our weights into HF's mixer; in_proj rows go from interleaved (x0, z0, x1, z1, ...) to [x; z]."""
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    for key in ("in_proj.weight", "in_proj.bias"):
        if key in sd:
            t = sd[key]
            sd[key] = torch.cat([t[0::2], t[1::2]], dim=0)
    hf.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("proj_bias,conv_bias,seqlen", [(False, True, 37), (True, False, 64)])
def test_mamba1_matches_hf_slow_path(proj_bias, conv_bias, seqlen):
    torch.manual_seed(0)
    cfg = _cfg(mamba_proj_bias=proj_bias, mamba_conv_bias=conv_bias)
    ours = Mamba1Mixer(cfg, 0)
    with torch.no_grad():  # non-trivial norm weights and biases so that every parameter matters
        for p in ours.parameters():
            if p.dim() == 1 and p is not ours.dt_proj.bias and p is not ours.D:
                p.add_(0.3 * torch.randn_like(p))
        ours.D.normal_()
    hf = _hf_mixer(cfg)
    _load_into_hf(ours, hf)
    x = torch.randn(3, seqlen, cfg.hidden_size, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_(True)
    y, y_hf = ours(x), hf(x_hf)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_hf.backward(g)
    torch.testing.assert_close(x.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        if name.startswith("in_proj"):
            ref = torch.stack([ref[: ref.shape[0] // 2], ref[ref.shape[0] // 2:]], dim=1).flatten(0, 1)
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_mamba1_init_rules():
    torch.manual_seed(0)
    cfg = get_preset("tiny", hidden_size=256, mamba_dt_rank=16, mamba_dt_min=0.001, mamba_dt_max=0.1)
    m = Mamba1Mixer(cfg, 0)
    n = cfg.mamba_d_state
    assert torch.equal(m.A_log, torch.log(torch.arange(1, n + 1.0)).expand(cfg.d_inner, n))
    assert torch.equal(m.D, torch.ones(cfg.d_inner))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= cfg.mamba_dt_min * (1 - 1e-5) and dt.max() <= cfg.mamba_dt_max * (1 + 1e-5)
    # log-uniform: the mean of log(dt) is the midpoint of [log dt_min, log dt_max] (512 samples, std ~0.06)
    mid = 0.5 * (math.log(cfg.mamba_dt_min) + math.log(cfg.mamba_dt_max))
    assert abs(dt.log().mean().item() - mid) < 0.3
    bound = cfg.dt_rank ** -0.5
    w = m.dt_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    for norm in (m.dt_layernorm, m.b_layernorm, m.c_layernorm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # reset_parameters restores the rules after a generic init overwrote them (what init_weights does)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m.reset_parameters()
    assert torch.equal(m.D, torch.ones(cfg.d_inner)) and F.softplus(m.dt_proj.bias).max() <= 0.1 * (1 + 1e-5)


def test_mamba1_meta_build_then_reset():
    cfg = _cfg()
    with torch.device("meta"):
        m = Mamba1Mixer(cfg, 0)
    m.to_empty(device="cpu")
    for lin in (m.in_proj, m.x_proj, m.out_proj):  # the model's generic init owns these
        lin.reset_parameters()
    m.reset_parameters()
    assert torch.isfinite(m.dt_proj.bias).all() and torch.equal(m.D, torch.ones(cfg.d_inner))
    assert torch.isfinite(m(torch.randn(1, 8, cfg.hidden_size))).all()


def test_mamba1_is_causal_and_ignores_doc_ids():
    torch.manual_seed(0)
    cfg = _cfg()
    m = Mamba1Mixer(cfg, 0)
    x = torch.randn(2, 40, cfg.hidden_size)
    y = m(x)
    x2 = x.clone()
    x2[:, 25:] = torch.randn_like(x2[:, 25:])
    y2 = m(x2, doc_ids=torch.zeros(2, 40, dtype=torch.long))
    torch.testing.assert_close(y[:, :25], y2[:, :25], rtol=0, atol=0)
    assert not torch.allclose(y[:, 25:], y2[:, 25:])


# ---------------------------------------------------------------------------------------------------
# Mamba-2

def _cfg2(**kw):
    base = dict(hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_mixer="mamba2",
                mamba2_head_dim=8, mamba2_n_groups=2, mamba2_chunk_size=16)
    base.update(kw)
    return get_preset("tiny", **base)


def _mamba2_naive(m, hidden):
    """Mamba2Mixer's forward with the SSD computed by the naive per-step recurrence."""
    G, N, H, P = m.ngroups, m.d_state, m.nheads, m.head_dim
    z, xBC, dt = torch.split(m.in_proj(hidden), [m.d_inner, m.conv_dim, H], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias).transpose(1, 2)
    x, B, C = torch.split(xBC, [m.d_inner, G * N, G * N], dim=-1)
    y = ssd_naive(x.unflatten(-1, (H, P)), dt, -torch.exp(m.A_log), B.unflatten(-1, (G, N)),
                  C.unflatten(-1, (G, N)), D=m.D, dt_bias=m.dt_bias, dt_softplus=True)
    y = y.flatten(-2) * F.silu(z)
    y = y.unflatten(-1, (G, -1))
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps)).flatten(-2) * m.norm.weight
    return m.out_proj(y)


@pytest.mark.parametrize("groups,seqlen", [(1, 37), (2, 64), (4, 20)])
def test_mamba2_matches_naive_recurrence_fwd_bwd(groups, seqlen):
    torch.manual_seed(0)
    m = Mamba2Mixer(_cfg2(mamba2_n_groups=groups), 0).double()
    with torch.no_grad():
        m.norm.weight.add_(0.3 * torch.randn_like(m.norm.weight))
        m.D.normal_()
    x = torch.randn(2, seqlen, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], gy)
    y0 = _mamba2_naive(m, x)
    grads0 = torch.autograd.grad(y0, [x, *m.parameters()], gy)
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    for (name, _), g, g0 in zip([("input", None), *m.named_parameters()], grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-8, atol=1e-10, msg=lambda msg: f"{name}: {msg}")


def test_mamba2_matches_hf_mamba2_mixer():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    torch.manual_seed(0)
    cfg = _cfg2()
    ours = Mamba2Mixer(cfg, 0)
    with torch.no_grad():
        ours.norm.weight.add_(0.3 * torch.randn_like(ours.norm.weight))
    hcfg = Mamba2Config(num_heads=ours.nheads, head_dim=cfg.mamba2_head_dim, hidden_size=cfg.hidden_size,
                        state_size=cfg.mamba_d_state, expand=cfg.mamba_expand, n_groups=cfg.mamba2_n_groups,
                        conv_kernel=cfg.mamba_d_conv, chunk_size=cfg.mamba2_chunk_size,
                        use_conv_bias=cfg.mamba_conv_bias, use_bias=cfg.mamba_proj_bias,
                        layer_norm_epsilon=ours.norm_eps, num_hidden_layers=1, vocab_size=16)
    hf = HFMamba2Mixer(hcfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 45, cfg.hidden_size)
    torch.testing.assert_close(ours(x), hf.eval()(x), rtol=1e-5, atol=1e-5)


def test_mamba2_init_rules():
    torch.manual_seed(0)
    cfg = _cfg2(hidden_size=512, mamba2_head_dim=4)  # 256 heads
    m = Mamba2Mixer(cfg, 0)
    a = torch.exp(m.A_log)
    assert a.min() >= 1 and a.max() <= 16 and a.std() > 3  # U(1, 16): std 4.3
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= cfg.mamba_dt_min * (1 - 1e-5) and dt.max() <= cfg.mamba_dt_max * (1 + 1e-5)
    assert torch.equal(m.D, torch.ones(m.nheads)) and torch.equal(m.norm.weight, torch.ones(cfg.d_inner))


# ---------------------------------------------------------------------------------------------------
# GPU: the same bf16 mixer through the CUDA/Triton kernels and through the references. Both paths see
# identical bf16 weights and inputs; they differ by where bf16 rounding happens inside the scan/conv
# (kernels keep bf16 I/O around fp32 math, references upcast whole tensors), ~2^-8 relative per rounding,
# amplified a little by the projections and by reductions in backward. We bound max|diff| / max|ref|
# by 3e-2 for the output and 6e-2 for input/parameter gradients.

def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _kernel_vs_reference(mixer, hidden, monkeypatch, out_tol=3e-2, grad_tol=6e-2):
    def run(force):
        monkeypatch.setenv("JAMBA_FORCE_REFERENCE", "1" if force else "0")
        mixer.zero_grad(set_to_none=True)
        x = hidden.detach().clone().requires_grad_(True)
        y = mixer(x)
        y.backward(torch.ones_like(y) * 0.01 + torch.randn(y.shape, generator=torch.Generator(y.device).manual_seed(0),
                                                           device=y.device, dtype=y.dtype))
        return y, x.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}

    yk, gxk, gpk = run(False)
    yr, gxr, gpr = run(True)
    print(f"\noutput rel err {_rel(yk, yr):.2e}; input grad {_rel(gxk, gxr):.2e}; "
          + "; ".join(f"{n} {_rel(gpk[n], gpr[n]):.2e}" for n in gpr))
    assert _rel(yk, yr) < out_tol, f"output rel err {_rel(yk, yr)}"
    assert _rel(gxk, gxr) < grad_tol, f"input grad rel err {_rel(gxk, gxr)}"
    for n in gpr:
        assert _rel(gpk[n], gpr[n]) < grad_tol, f"grad {n} rel err {_rel(gpk[n], gpr[n])}"


@pytest.mark.gpu
def test_mamba1_mixer_kernels_match_reference_bf16(monkeypatch):
    avail = kernels.kernels_available()
    if not (avail["selective_scan"] and avail["causal_conv1d"]):
        pytest.skip(f"kernels not importable: {avail}")
    torch.manual_seed(0)
    cfg = get_preset("tiny", hidden_size=256, mamba_d_state=16, mamba_dt_rank=16)
    m = Mamba1Mixer(cfg, 0).cuda().bfloat16()
    _kernel_vs_reference(m, torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16), monkeypatch)


@pytest.mark.gpu
def test_mamba2_mixer_kernels_match_reference_bf16(monkeypatch):
    avail = kernels.kernels_available()
    if not (avail["ssd"] and avail["causal_conv1d"]):
        pytest.skip(f"kernels not importable: {avail}")
    torch.manual_seed(0)
    cfg = _cfg2(hidden_size=256, mamba_d_state=64, mamba2_head_dim=64, mamba2_n_groups=2, mamba2_chunk_size=128)
    m = Mamba2Mixer(cfg, 0).cuda().bfloat16()
    _kernel_vs_reference(m, torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16), monkeypatch)
