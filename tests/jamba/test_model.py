"""JambaForCausalLM: meta build and parameter counts of Jamba-v0.1 against transformers, forward/loss
semantics, activation checkpointing, tied embeddings, document masking, attention math, init rules."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from jamba.attention import Attention
from jamba.config import ConfigError, JambaConfig, get_preset
from jamba.model import JambaForCausalLM, JambaOutput


def tiny(**kw):
    return get_preset("tiny", **kw)


def attn_only(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, layer_pattern="AD AE", num_experts=4, num_experts_per_tok=2)
    return JambaConfig(**{**base, **kw})


# ---- Jamba-v0.1 on the meta device ---------------------------------------------------------------

def test_jamba_v01_meta_build_and_counts_match_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("jamba-v0.1")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    build_s = time.perf_counter() - t0
    counts = model.num_params()
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"jamba-v0.1 meta build {build_s:.2f}s: total {counts['total']:,} active {counts['active']:,} "
          f"experts {expert:,} embedding {counts['embedding']:,}")
    assert build_s < 20
    assert all(p.is_meta for p in model.parameters())

    hf_cfg = transformers.JambaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size, attn_layer_period=cfg.attn_layer_period,
        attn_layer_offset=cfg.attn_layer_offset, expert_layer_period=cfg.expert_layer_period,
        expert_layer_offset=cfg.expert_layer_offset, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, mamba_d_state=cfg.mamba_d_state,
        mamba_d_conv=cfg.mamba_d_conv, mamba_expand=cfg.mamba_expand, mamba_dt_rank=cfg.mamba_dt_rank,
        tie_word_embeddings=False)
    with torch.device("meta"):
        ref = transformers.JambaForCausalLM(hf_cfg)
    hf_total = sum(p.numel() for p in ref.parameters())
    hf_expert = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    print(f"transformers JambaForCausalLM: total {hf_total:,} experts {hf_expert:,}")
    assert counts["total"] == hf_total == 51_570_323_328
    assert expert == hf_expert == 45_097_156_608
    # active: all non-expert parameters + top-2 of 16 experts
    assert counts["active"] == hf_total - hf_expert * 14 // 16 == 12_110_311_296
    assert round(counts["total"] / 1e9, 2) == 51.57 and round(counts["active"] / 1e9, 2) == 12.11
    assert round(expert / 1e9, 2) == 45.10


def test_meta_then_to_empty_and_init():
    cfg = tiny(tie_word_embeddings=True)
    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    again = JambaForCausalLM(cfg)
    again.init_weights(seed=3)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "init_weights(seed) must be deterministic"
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    assert torch.isfinite(model(x, labels=x).loss)


# ---- forward / loss semantics -------------------------------------------------------------------

def test_forward_logits_and_loss_semantics():
    cfg = tiny(router_aux_loss_coef=0.05, router_z_loss_coef=0.01)
    torch.manual_seed(0)
    model = JambaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)  # aligned
    out = model(x)
    assert isinstance(out, JambaOutput) and out.loss is None and out.logits.shape == (2, 24, cfg.vocab_size)
    n_moe = sum(s.ffn == "moe" for s in cfg.layer_specs())
    assert out.expert_counts.shape == (n_moe, cfg.num_experts)
    assert (out.expert_counts.sum(-1) == 2 * 24 * cfg.num_experts_per_tok).all()
    out2 = model(x, targets=targets)
    assert out2.logits is None
    ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out2.lm_loss, ce, rtol=1e-5, atol=1e-6)
    # HF's convention: labels=x is shifted inside, the same targets as above
    assert torch.equal(model(x, labels=x).lm_loss, out2.lm_loss)
    torch.testing.assert_close(out2.loss, out2.lm_loss + 0.05 * out2.aux_loss + 0.01 * out2.z_loss)
    # the load-balancing loss is >= k (equality at perfect balance, HF's normalisation) -- k = 2 here
    assert out2.aux_loss.item() >= 0.99 * cfg.num_experts_per_tok


def test_dense_model_has_no_moe_outputs():
    cfg = attn_only(layer_pattern="AD AD", num_experts=1, num_experts_per_tok=1)
    model = JambaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    out = model(x, labels=x)
    assert out.aux_loss is None and out.expert_counts is None and out.z_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_forced_balance_warns_and_balances_the_whole_model(caplog):
    cfg = get_preset("tiny", moe_force_balance=True)
    with caplog.at_level("WARNING", logger="jamba.model"):
        model = JambaForCausalLM(cfg)
    assert "moe_force_balance=true" in caplog.text and "real training" in caplog.text
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    counts = model(x, labels=x).expert_counts  # (MoE layers, E): 32 tokens x k copies, E experts
    assert (counts == 32 * cfg.num_experts_per_tok // cfg.num_experts).all(), counts


def test_expert_biases_on_meta_build_save_and_update():
    """model.moe_router_bias_update_rate > 0: every MoE layer has an fp32 `expert_bias` buffer (zero after
    init, also through meta + to_empty, in the state dict: checkpoints carry it); update_expert_biases takes the
    step's (MoE layers, E) counts; without the rate the model has no such buffer (HF's state dict)."""
    cfg = get_preset("tiny", moe_router_bias_update_rate=0.01)
    with torch.device("meta"):
        model = JambaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    keys = [k for k in model.state_dict() if k.endswith("expert_bias")]
    n_moe = len(keys)
    assert n_moe > 0 and all(model.state_dict()[k].abs().sum() == 0 for k in keys)
    assert not any(k.endswith("expert_bias") for k in JambaForCausalLM(get_preset("tiny")).state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    counts = model(x, labels=x).expert_counts  # (MoE layers, E)
    model.update_expert_biases(counts)
    for k, c in zip(keys, counts):
        b, off = model.state_dict()[k], c.float() - c.float().mean()
        assert b.dtype == torch.float32 and abs(b.sum().item()) < 1e-6
        assert (off != 0).any() and (torch.sign(b[off != 0]) == -torch.sign(off[off != 0])).all(), (b, c)
    with pytest.raises(ValueError, match="expert_counts has shape"):
        model.update_expert_biases(counts[:1])
    with pytest.raises(ValueError, match="one count per expert"):
        model.model.layers[1].feed_forward.update_expert_bias(counts[0, :2], 0.01)
    model.to(torch.bfloat16)  # the weights; the biases stay fp32 (bf16 would lose their small steps)
    assert model.model.layers[1].feed_forward.expert_bias.dtype == torch.float32
    assert model.model.layers[1].feed_forward.router.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="moe_router_bias_update_rate=inf"):
        get_preset("tiny", moe_router_bias_update_rate=float("inf"))


def test_backward_reaches_every_parameter():
    cfg = tiny()
    torch.manual_seed(0)
    model = JambaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_bf16_forward_backward_cpu():
    cfg = tiny()
    model = JambaForCausalLM(cfg).to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    out = model(x, labels=x)
    assert out.lm_loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
    assert model(x).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_bf16_autocast_forward_backward_cpu(mixer):
    """train.precision=bf16 on CPU: fp32 parameters under bf16 autocast (the reference scan's hand-written
    backward met a bf16 gradient beside its fp32 states and failed: 'expected scalar type Float')."""
    cfg = tiny()
    cfg.mamba_mixer = mixer
    model = JambaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kinds", [["all"], ["mamba"], ["attention", "moe"], ["mlp"]])
def test_activation_checkpointing_gives_identical_grads(kinds):
    cfg = tiny()
    torch.manual_seed(0)
    ref = JambaForCausalLM(cfg)
    ac = JambaForCausalLM(cfg.replace(activation_checkpointing=kinds))
    ac.load_state_dict(ref.state_dict())
    n_ckpt = sum(layer.activation_checkpointing for layer in ac.model.layers)
    assert n_ckpt > 0
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    losses = []
    for m in (ref, ac):
        out = m(x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert torch.equal(losses[0], losses[1])
    g_ac = dict(ac.named_parameters())
    for n, p in ref.named_parameters():
        # recomputation replays the same ops on the same inputs: bitwise-identical gradients on CPU
        assert torch.equal(p.grad, g_ac[n].grad), n


def test_tied_embeddings():
    cfg = tiny(tie_word_embeddings=True)
    model = JambaForCausalLM(cfg)
    untied = JambaForCausalLM(cfg.replace(tie_word_embeddings=False))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert untied.num_params()["total"] - model.num_params()["total"] == cfg.vocab_size * cfg.hidden_size
    assert "lm_head.weight" in model.state_dict()  # same keys as HF (which also lists the tied key)
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    model(x, labels=x).loss.backward()
    # one gradient, from both uses: equals the sum of lookup and output-projection gradients
    g = model.model.embed_tokens.weight.grad
    assert g is not None and g is model.lm_head.weight.grad
    torch.testing.assert_close(model(x).logits, F.linear(model.model.final_layernorm(
        _hidden(model, x)), model.model.embed_tokens.weight))


def _hidden(model, x):
    h = model.model.embed_tokens(x)
    for layer in model.model.layers:
        h, _ = layer(h)
    return h


# ---- attention ----------------------------------------------------------------------------------

def naive_attention(attn: Attention, x, mask=None):
    B, L, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, L, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, L, -1, hd).transpose(1, 2)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # HF repeat_kv: kv head j serves q heads jg..
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    allowed = torch.ones(L, L, dtype=torch.bool).tril() if mask is None else mask
    s = s.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(s, -1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_attention_matches_naive_gqa(kv):
    cfg = attn_only(num_key_value_heads=kv)
    torch.manual_seed(0)
    attn = Attention(cfg, 0).double()
    x = torch.randn(2, 11, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_rope", [False, True])
def test_document_masking_blocks_cross_document_attention(use_rope):
    """Attention-only model with document masking: the outputs on a packed document equal those of the
    document alone (no positional embedding; RoPE is relative, so a shift does not matter either), and
    changing another document's tokens changes nothing in this one."""
    cfg = attn_only(document_masking=True, use_rope=use_rope)
    torch.manual_seed(0)
    model = JambaForCausalLM(cfg).double()
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (5, 7, 4))
    packed = torch.cat([a, b, c], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids).logits
        for (lo, hi), doc in (((0, 5), a), ((5, 12), b), ((12, 16), c)):
            alone = model(doc).logits
            # fp64 model; RoPE tables are fp32 (a position shift re-rounds them): 1e-5 then, else 1e-9
            tol = 1e-5 if use_rope else 1e-9
            torch.testing.assert_close(got[:, lo:hi], alone, rtol=tol, atol=tol)
        other = packed.clone()
        other[:, :5] = (other[:, :5] + 1) % cfg.vocab_size
        got2 = model(other, doc_ids=doc_ids).logits
        # not bit-equal: the CPU's blocked kernels (SDPA, GEMM) may round a row one ulp differently when
        # other rows change (seen with ATEN_CPU_CAPABILITY=default/avx2: 5.6e-17); a leak moves it by >1e-3
        torch.testing.assert_close(got2[:, 5:], got[:, 5:], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got2[:, :5], got[:, :5])
        # without document masking, later documents do see earlier ones
        model.config.document_masking = False
        try:
            leaky = model(packed, doc_ids=doc_ids).logits
        finally:
            model.config.document_masking = True
        assert not torch.allclose(leaky[:, 5:12], got[:, 5:12])


def test_rope_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from jamba.attention import apply_rope, rope_cos_sin

    q = torch.randn(2, 4, 10, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 10, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(10, 16, 10000.0, "cpu", torch.float64)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(q, cos, sin), want_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), want_k)


# ---- init and weight decay ----------------------------------------------------------------------

def test_init_table():
    cfg = get_preset("small", num_hidden_layers=2, vocab_size=4096)  # 1 mamba + 1 attention? check below
    cfg = cfg.replace(layer_pattern="MD AE", num_hidden_layers=2)
    model = JambaForCausalLM(cfg)
    std = cfg.initializer_range
    sd = dict(model.named_parameters())
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.1.feed_forward.router.weight", "model.layers.1.feed_forward.experts.gate_proj",
                 "model.layers.1.feed_forward.experts.down_proj", "model.layers.0.feed_forward.up_proj.weight",
                 "model.layers.0.mamba.in_proj.weight", "model.layers.0.mamba.out_proj.weight"]:
        p = sd[name]
        assert abs(p.std().item() - std) < 0.05 * std and abs(p.mean().item()) < 0.05 * std, name
    for name, p in sd.items():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    m = model.model.layers[0].mamba
    torch.testing.assert_close(m.A_log[0], torch.log(torch.arange(1.0, cfg.mamba_d_state + 1)))
    assert torch.equal(m.D, torch.ones_like(m.D))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= cfg.mamba_dt_init_floor * 0.999 and dt.max() <= cfg.mamba_dt_max * 1.001
    assert m.dt_proj.weight.abs().max() <= cfg.dt_rank ** -0.5


def test_weight_decay_filter():
    model = JambaForCausalLM(tiny(mamba_proj_bias=True))
    decay = {n for n, p in model.named_parameters() if JambaForCausalLM.weight_decay_filter(n, p)}
    no_decay = {n for n, _ in model.named_parameters()} - decay
    assert "model.embed_tokens.weight" in decay and "lm_head.weight" in decay
    assert "model.layers.1.feed_forward.experts.gate_proj" in decay
    assert "model.layers.0.mamba.conv1d.weight" in decay
    for n in no_decay:
        assert n.endswith(("A_log", ".D", "bias")) or "norm" in n, n
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith(".D") for n in no_decay)
    assert any(n.endswith("dt_proj.bias") for n in no_decay) and "model.final_layernorm.weight" in no_decay


def test_mamba2_layout_builds_and_runs():
    from jamba import mamba

    if not hasattr(mamba, "Mamba2Mixer"):
        pytest.skip("jamba.mamba has no Mamba2Mixer yet")
    cfg = tiny(mamba_mixer="mamba2", mamba2_head_dim=16, mamba2_chunk_size=8)
    model = JambaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 20))
    model(x, labels=x).loss.backward()
    assert model.model.layers[0].mamba.__class__.__name__ == "Mamba2Mixer"
