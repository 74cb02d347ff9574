"""FLOPs per token: the documented formula, checked against an independent hand count of the matmul
parameters, and its sanity relative to 6 x active non-embedding parameters."""

import pytest

from jamba.config import get_preset
from jamba.flops import flops_per_token, forward_flops_per_token, param_counts


def hand_matmul_params(cfg) -> int:
    """Per-token matmul parameters of a Mamba-1 Jamba, written out from the architecture."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd, nq, nkv = cfg.attn_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    Di, N, R = cfg.d_inner, cfg.mamba_d_state, cfg.dt_rank
    total = V * H  # lm_head (a matmul even when tied)
    for s in cfg.layer_specs():
        if s.mixer == "attention":
            total += H * nq * hd + 2 * H * nkv * hd + nq * hd * H
        else:
            total += H * 2 * Di + Di * (R + 2 * N) + R * Di + Di * H  # in, x, dt, out projections
        if s.ffn == "moe":
            total += H * cfg.num_experts + cfg.num_experts_per_tok * 3 * H * I  # router + k experts
        else:
            total += 3 * H * I
    return total


@pytest.mark.parametrize("preset", ["tiny", "bench-3b", "jamba-v0.1"])
def test_matmul_params_match_hand_count(preset):
    cfg = get_preset(preset)
    assert param_counts(cfg)["matmul_active"] == hand_matmul_params(cfg)


def test_jamba_v01_flops_formula():
    cfg = get_preset("jamba-v0.1")
    L = 4096
    pc = param_counts(cfg)
    n_attn = sum(s.mixer == "attention" for s in cfg.layer_specs())
    n_mamba = cfg.num_hidden_layers - n_attn
    want = 3 * (2 * hand_matmul_params(cfg)
                + n_attn * 4 * cfg.num_attention_heads * cfg.attn_head_dim * (L + 1) / 2
                + n_mamba * (9 * cfg.d_inner * cfg.mamba_d_state + 2 * cfg.d_inner * cfg.mamba_d_conv))
    got = flops_per_token(cfg, L)
    print(f"jamba-v0.1 @ {L}: {got / 1e9:.1f} GFLOP/token (6 x active non-embedding = "
          f"{6 * (pc['active'] - pc['embedding']) / 1e9:.1f})")
    assert got == pytest.approx(want, rel=1e-12)
    # ~ 6 x active non-embedding parameters (+ attention and scan, - norms/conv/A/D params that are no matmul)
    six_n = 6 * (pc["active"] - pc["embedding"])
    assert 0.99 * six_n < got < 1.05 * six_n
    # attention is the only seq_len-dependent term: slope 3 * n_attn * 4 * heads * head_dim / 2 per token
    slope = (flops_per_token(cfg, 2 * L) - flops_per_token(cfg, L)) / L
    assert slope == pytest.approx(3 * n_attn * 2 * cfg.num_attention_heads * cfg.attn_head_dim)
    assert forward_flops_per_token(cfg, L) * 3 == pytest.approx(got)


def test_mamba2_flops_use_its_own_params():
    from jamba import mamba

    if not hasattr(mamba, "Mamba2Mixer"):
        pytest.skip("jamba.mamba has no Mamba2Mixer yet")
    cfg = get_preset("tiny", mamba_mixer="mamba2", mamba2_head_dim=16)
    assert flops_per_token(cfg, 256) > 6 * param_counts(cfg)["matmul_active"]
