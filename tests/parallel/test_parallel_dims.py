"""ParallelDims validation: every invalid layout fails before any process group, naming the fix."""

import pytest

from jamba.config import ConfigError, get_preset
from parallel import ParallelConfig, ParallelDims

TINY = get_preset("tiny")  # heads 4, kv 2, d_inner 128, intermediate 128, vocab 2048, experts 4


def dims(world, seq_len=None, **kw):
    return ParallelDims(ParallelConfig(**kw), world_size=world, model=TINY, seq_len=seq_len)


def test_dp_rank_from_global_rank(monkeypatch):
    # 8 ranks as (dp_replicate=2, dp_shard=2, cp=1, tp=2): ranks 2k and 2k+1 (one TP group) share a batch
    d = dims(8, dp_replicate=2, dp_shard=2, tp=2)
    seen = []
    for r in range(8):
        monkeypatch.setenv("RANK", str(r))
        seen.append(d.dp_rank)
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3] and d.dp_size == 4


def test_fill_and_derived_degrees():
    d = dims(8, tp=2, ep=2)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.ep, d.efsdp) == (1, 4, 1, 2, 2, 2)
    assert d.dp_size == 4 and d.dp_cp_size == 4
    d = dims(4, dp_replicate=-1, dp_shard=2)
    assert (d.dp_replicate, d.dp_shard) == (2, 2)
    assert dims(1).dp_shard == 1


@pytest.mark.parametrize("world,kw,needle", [
    (4, dict(dp_shard=2), r"dp_replicate\(1\) \* dp_shard\(2\) \* cp\(1\) \* tp\(1\) = 2 != WORLD_SIZE\(4\)"),
    (6, dict(tp=4), r"WORLD_SIZE\(6\) is not divisible by .* tp\(4\)"),
    (3, dict(tp=3), r"parallel.tp=3 must divide model.num_attention_heads=4: choose tp in \[1, 2, 4\]"),
    (2, dict(ep=3, dp_shard=2), r"parallel.ep=3 must divide dp_shard\(2\)"),
    (6, dict(ep=3), r"parallel.ep=3 must divide model.num_experts=4"),
    (4, dict(tp=2, ep=4), r"parallel.ep=4 must divide dp_shard\(2\)"),
    (3, dict(ep=2), r"parallel.ep=2 must divide dp_shard\(3\) .* choose ep in \[1\] "),  # 3 does not divide 4 experts
    (8, dict(dp_shard=1), r"= 1 != WORLD_SIZE\(8\); set parallel.dp_shard=-1 \(fills to 8; the parallel=fsdp preset "
                          r"does that\), or launch 1 process \(e.g"),
    (8, dict(dp_shard=1, tp=2), r"= 2 != WORLD_SIZE\(8\); set parallel.dp_shard=-1 \(fills to 4\), or launch 2 "
                                r"processes"),  # no preset hint: parallel=fsdp would drop tp=2
    (4, dict(cp=2, tp=2, sequence_parallel=True), r"sequence_parallel=true with parallel.cp=2 is not supported"),
    (2, dict(sequence_parallel=True), r"sequence_parallel=true needs parallel.tp > 1"),
])
def test_invalid_layouts(world, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        dims(world, **kw)


def test_sequence_length_must_split_over_tp():
    with pytest.raises(ConfigError, match=r"sequence length 30 must be divisible by tp\(4\)"):
        ParallelDims(ParallelConfig(tp=4, sequence_parallel=True), world_size=4, model=TINY, seq_len=30)
    ParallelDims(ParallelConfig(tp=4, sequence_parallel=True), world_size=4, model=TINY, seq_len=32)


def test_invalid_model_shapes():
    # d_inner = 1 * 50 is not divisible by tp=4 (explicit head_dim keeps the 4 heads valid)
    m = get_preset("tiny", hidden_size=50, head_dim=16, mamba_expand=1)
    with pytest.raises(ConfigError, match=r"parallel.tp=4 must divide d_inner .*=50: choose tp in \[1, 2\]"):
        ParallelDims(ParallelConfig(tp=4), world_size=4, model=m)
    # kv heads 4 and tp 8 is fine (replicated kv); kv 4 and tp 6 is neither a divisor nor a multiple
    m = get_preset("tiny", hidden_size=96, num_attention_heads=12, num_key_value_heads=4,
                   intermediate_size=96, vocab_size=96 * 8)
    ParallelDims(ParallelConfig(tp=4), world_size=4, model=m)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=4: tp must divide the kv heads"):
        ParallelDims(ParallelConfig(tp=6), world_size=6, model=m)
    with pytest.raises(ConfigError, match=r"model.vocab_size=2049"):
        ParallelDims(ParallelConfig(tp=2), world_size=2, model=get_preset("tiny", vocab_size=2049))
    with pytest.raises(ConfigError, match=r"Mamba-2 mixer is not supported"):
        ParallelDims(ParallelConfig(tp=2), world_size=2,
                     model=get_preset("tiny", mamba_mixer="mamba2", mamba2_head_dim=16))
    with pytest.raises(ConfigError, match=r"tie_word_embeddings=true is not supported yet"):
        ParallelDims(ParallelConfig(tp=2), world_size=2, model=get_preset("tiny", tie_word_embeddings=True))
    with pytest.raises(ConfigError, match=r"no MoE layers"):
        ParallelDims(ParallelConfig(ep=2), world_size=2, model=get_preset("tiny", num_experts=1, num_experts_per_tok=1))


def test_schema_errors():
    with pytest.raises(ConfigError, match=r"parallel.tp=0 must be a positive integer"):
        ParallelConfig(tp=0)
    with pytest.raises(ConfigError, match=r"param_dtype='fp8'"):
        ParallelConfig(param_dtype="fp8")
    with pytest.raises(ConfigError, match=r"cannot both be -1"):
        ParallelConfig(dp_replicate=-1, dp_shard=-1)


def test_a_world_that_tp_does_not_divide_suggests_degrees_that_work():
    """3 processes with tp=2: the advice lists only degrees dividing 3 that the model's 4 heads allow (not 3)."""
    with pytest.raises(ConfigError, match=r"WORLD_SIZE\(3\) is not divisible by .* tp\(2\) = 2, .* choose tp in \[1\] "
                                          r"\(dividing 3 and suiting the model\), or launch a multiple of 2 processes"):
        ParallelDims(ParallelConfig(tp=2), world_size=3, model=TINY)


def test_context_parallel_layouts():
    d = dims(8, cp=2, tp=2, ep=4, seq_len=96)
    assert (d.dp_shard, d.cp, d.tp, d.efsdp, d.dp_size, d.dp_cp_size) == (2, 2, 2, 1, 2, 4)
    dims(4, cp=4, seq_len=96)  # 96 is not a power of two; 24 tokens per rank
    # every curriculum stage is checked, not only the longest
    # (suggested: the divisors of 90 that also fit 4 processes)
    with pytest.raises(ConfigError, match=r"sequence length 90 must be divisible by parallel.cp=4 .* choose cp in "
                                          r"\[1, 2\]$"):
        ParallelDims(ParallelConfig(cp=4), world_size=4, model=TINY, seq_len=[64, 90, 1024])
    # Mamba channels split over tp * cp: tiny's d_inner = 128 cannot split 256 ways
    with pytest.raises(ConfigError, match=r"d_inner .* = 128\) must be divisible by tp\(2\) \* cp\(128\)"):
        dims(256, cp=128, tp=2)
    # Mamba-2 heads split over cp: tiny's 128 channels in heads of 16 -> 8 heads; with 2 B/C groups a rank's
    # heads must read whole groups or one group (cp divides 2 or 2 divides cp)
    m2 = get_preset("tiny", mamba_mixer="mamba2", mamba2_head_dim=16, mamba2_n_groups=2)
    ParallelDims(ParallelConfig(cp=4), world_size=4, model=m2)
    with pytest.raises(ConfigError, match=r"split their 8 heads .* choose cp in \[2, 4, 8\], or a smaller "
                                          r"model.mamba2_head_dim"):
        ParallelDims(ParallelConfig(cp=3), world_size=3, model=m2)
    with pytest.raises(ConfigError, match=r"choose cp in \[2, 4, 8\]"):
        ParallelDims(ParallelConfig(cp=16), world_size=16, model=m2)
    m2_12heads = get_preset("tiny", mamba_mixer="mamba2", mamba2_head_dim=16, mamba2_n_groups=4, hidden_size=96)
    with pytest.raises(ConfigError, match=r"split their 12 heads .* choose cp in \[2, 4, 12\], or "
                                          r"model.mamba2_n_groups dividing or divisible by 6"):
        ParallelDims(ParallelConfig(cp=6), world_size=6, model=m2_12heads)
    # jamba-v0.1 (32 heads, 8 kv): tp=8 leaves 4 heads per rank, which cp=8 cannot split (Ulysses), so attention
    # all-gathers K/V: at 1M tokens with document masking its explicit mask would not fit, so that is refused
    # with the fix; causal attention (the default) uses an unmaterialised bias and runs at any length
    jamba = get_preset("jamba-v0.1")
    jamba_docs = get_preset("jamba-v0.1", document_masking=True)
    with pytest.raises(ConfigError, match=r"cp=8 does not divide the 4 query heads per TP rank .* choose cp in "
                                          r"\[2, 4\], a smaller tp, or model.document_masking=false"):
        ParallelDims(ParallelConfig(cp=8, tp=8), world_size=64, model=jamba_docs, seq_len=[4096, 1048576])
    ParallelDims(ParallelConfig(cp=8, tp=8), world_size=64, model=jamba, seq_len=[4096, 1048576])
    ParallelDims(ParallelConfig(cp=8, tp=4), world_size=64, model=jamba_docs, seq_len=[4096, 1048576])
    ParallelDims(ParallelConfig(cp=8, tp=8), world_size=64, model=jamba_docs, seq_len=4096)  # short: mask is fine


def test_ep_exchange_is_checked():
    assert ParallelConfig(ep=2, ep_exchange="padded").ep_exchange == "padded"
    assert ParallelConfig(ep=2, ep_exchange="overlap").ep_exchange == "overlap"
    with pytest.raises(ConfigError, match=r"parallel.ep_exchange='fixed' must be one of \['sized', 'padded', 'overlap'\]"):
        ParallelConfig(ep=2, ep_exchange="fixed")


def test_ep_overlap_sms_is_checked():
    assert ParallelConfig(ep=2, ep_exchange="overlap").ep_overlap_sms == 0
    assert ParallelConfig(ep=2, ep_exchange="overlap", ep_overlap_sms=16).ep_overlap_sms == 16
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"parallel.ep_overlap_sms={bad!r} must be an integer >= 0"):
            ParallelConfig(ep=2, ep_exchange="overlap", ep_overlap_sms=bad)
    with pytest.raises(ConfigError, match=r"ep_overlap_sms=16 applies only to parallel.ep_exchange=overlap \(here "
                                          r"'sized'\); set it to 0 or use overlap"):
        ParallelConfig(ep=2, ep_overlap_sms=16)


@pytest.mark.parametrize("kw,world", [(dict(ep=2), 2), (dict(ep=2), 8), (dict(ep=4, tp=2), 16),
                                      (dict(ep=2, tp=2, dp_replicate=2), 16), (dict(ep=2, cp=2), 8)])
def test_ep_rank_groups_are_the_expert_meshs_ep_rows(kw, world):
    """The overlapped exchange creates its own groups over these ranks (parallel/ep_overlap.py): they must be the
    expert mesh's (dp_replicate, efsdp, ep, tp) rows along "ep", each rank in exactly one, every rank built alike."""
    d = dims(world, seq_len=64, **kw)
    R, F, E, T = d.dp_replicate, d.efsdp, d.ep, d.tp
    expected = [[((r * F + f) * E + e) * T + t for e in range(E)] for r in range(R) for f in range(F)
                for t in range(T)]
    assert d.ep_rank_groups() == expected
    assert sorted(sum(expected, [])) == list(range(world))
