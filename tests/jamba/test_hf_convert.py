"""HF interop without our model: config conversion both ways, key/layout plans, safetensors IO, CLI errors.

The parity of the converted weights (same logits, losses, gradients) is in test_hf_parity.py.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from jamba import hf  # noqa: E402
from jamba.config import ConfigError, JambaConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> JambaConfig:
    base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
                expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4)
    base.update(kw)
    return JambaConfig(**base)


@pytest.mark.parametrize("kw", [
    {},
    dict(num_experts=1, num_experts_per_tok=1, tie_word_embeddings=True),
    dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=3,
         expert_layer_offset=2, num_experts=8, num_experts_per_tok=1, num_key_value_heads=1),
    dict(mamba_dt_rank=None, rms_norm_eps=1e-5, router_aux_loss_coef=0.01, mamba_proj_bias=True,
         mamba_conv_bias=False),
])
def test_config_round_trip(kw):
    cfg = tiny(**kw)
    hf_cfg = hf.config_to_hf(cfg, use_mamba_kernels=False)
    assert hf_cfg.use_mamba_kernels is False
    assert hf_cfg.mamba_dt_rank == cfg.dt_rank
    assert hf_cfg.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf_cfg.router_aux_loss_coef == cfg.router_aux_loss_coef
    assert hf_cfg.rms_norm_eps == cfg.rms_norm_eps
    hf_layout = [(t, "moe" if e > 1 else "mlp") for t, e in zip(hf_cfg.layers_block_type, hf_cfg.layers_num_experts)]
    assert hf_layout == [tuple(s) for s in cfg.layer_specs()]
    back = hf.config_from_hf(hf_cfg)
    assert back.layer_specs() == cfg.layer_specs()
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "num_experts", "num_experts_per_tok", "mamba_d_state", "mamba_d_conv",
              "mamba_expand", "dt_rank", "mamba_conv_bias", "mamba_proj_bias", "rms_norm_eps",
              "tie_word_embeddings", "router_aux_loss_coef"):
        assert getattr(back, f) == getattr(cfg, f), f
    # from a config.json dict as well
    assert hf.config_from_hf(json.loads(hf_cfg.to_json_string())).layer_specs() == cfg.layer_specs()


def test_config_from_hf_defaults_are_jamba_v01():
    cfg = hf.config_from_hf(transformers.JambaConfig())  # HF defaults = ai21labs/Jamba-v0.1
    ref = hf.load_our_config("jamba-v0.1")
    assert cfg.layer_specs() == ref.layer_specs()
    assert (cfg.dt_rank, cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (256, 16, 2, 65536)


def test_hf_dense_config_with_top2_imports_as_dense():
    cfg = hf.config_from_hf(dict(model_type="jamba", hidden_size=32, num_attention_heads=4, num_experts=1,
                                 num_experts_per_tok=2, num_hidden_layers=2))
    assert cfg.num_experts == 1 and cfg.num_experts_per_tok == 1
    assert all(s.ffn == "mlp" for s in cfg.layer_specs())


def test_periodic_layer_pattern_exports_as_periods():
    cfg = tiny(layer_pattern="MD AE MD AE MD AE", num_hidden_layers=6)
    hf_cfg = hf.config_to_hf(cfg)
    assert (hf_cfg.attn_layer_period, hf_cfg.attn_layer_offset) == (2, 1)
    assert (hf_cfg.expert_layer_period, hf_cfg.expert_layer_offset) == (2, 1)
    # all-mamba, all-dense pattern: "no layer" is period n+1, offset n
    cfg = tiny(layer_pattern="MD MD MD", num_hidden_layers=3)
    hf_cfg = hf.config_to_hf(cfg)
    assert set(hf_cfg.layers_block_type) == {"mamba"} and set(hf_cfg.layers_num_experts) == {1}
    # the user's spelling of the pattern survives a round trip through a base config
    back = hf.config_from_hf(hf.config_to_hf(tiny(layer_pattern="MDAEMDAE", num_hidden_layers=4)),
                             base=tiny(layer_pattern="MDAEMDAE", num_hidden_layers=4))
    assert back.layer_pattern == "MDAEMDAE"


@pytest.mark.parametrize("kw, key", [
    (dict(layer_pattern="AD MD MD AD AD MD", num_hidden_layers=6), "layer_pattern"),
    (dict(layer_pattern="MD ME ME MD", num_hidden_layers=4), "layer_pattern"),
    (dict(use_rope=True), "use_rope"),
    (dict(mamba_mixer="mamba2", mamba2_head_dim=16), "mamba_mixer"),
    (dict(moe_renormalize=True), "moe_renormalize"),
    (dict(head_dim=16), "head_dim"),
    (dict(moe_router_bias_update_rate=1e-3), "moe_router_bias_update_rate"),
    (dict(moe_force_balance=True), "moe_force_balance"),
])
def test_export_refuses_what_hf_cannot_express(kw, key):
    with pytest.raises(ConfigError, match=key):
        hf.config_to_hf(tiny(**kw))


def test_in_proj_interleave_is_a_permutation_and_inverse():
    d_inner, h = 6, 3
    w = torch.arange(2 * d_inner * h, dtype=torch.float32).reshape(2 * d_inner, h)  # HF [x; z]
    ours = hf.interleave_in_proj(w)
    for c in range(d_inner):
        assert torch.equal(ours[2 * c], w[c])  # x channel c
        assert torch.equal(ours[2 * c + 1], w[d_inner + c])  # z channel c
    assert torch.equal(hf.deinterleave_in_proj(ours), w)
    b = torch.arange(2 * d_inner, dtype=torch.float32)
    assert torch.equal(hf.deinterleave_in_proj(hf.interleave_in_proj(b)), b)


def _hf_random_state_dict(cfg, per_expert=False):
    hf_cfg = hf.config_to_hf(cfg, use_mamba_kernels=False)
    with torch.device("meta"):
        m = transformers.JambaForCausalLM(hf_cfg)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    if per_expert:
        sd = to_per_expert_layout(sd)
    return sd


def to_per_expert_layout(sd):
    """transformers 5.x stacked experts -> the per-expert keys of 4.x checkpoints (e.g. Jamba-v0.1 files)."""
    return dict(hf.split_experts_4x(sd.items()))


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_layouts(tied):
    cfg = tiny(tie_word_embeddings=tied)
    sd5 = _hf_random_state_dict(cfg)
    ours = hf.state_dict_from_hf(sd5, cfg)
    # our expert layout: gate = first I rows of gate_up, up = the rest
    e = "model.layers.1.feed_forward.experts"
    I = cfg.intermediate_size
    assert ours[f"{e}.gate_proj"].shape == (4, I, 32) and ours[f"{e}.down_proj"].shape == (4, 32, I)
    assert torch.equal(ours[f"{e}.gate_proj"], sd5[f"{e}.gate_up_proj"][:, :I])
    assert torch.equal(ours[f"{e}.up_proj"], sd5[f"{e}.gate_up_proj"][:, I:])
    assert f"{e}.gate_up_proj" not in ours
    assert torch.equal(ours["model.layers.0.mamba.in_proj.weight"],
                       hf.interleave_in_proj(sd5["model.layers.0.mamba.in_proj.weight"]))
    assert ("lm_head.weight" in ours) == (not tied)
    # 4.x per-expert layout gives the same tensors
    sd4 = to_per_expert_layout(sd5)
    assert torch.equal(sd4["model.layers.1.feed_forward.experts.3.up_proj.weight"], sd5[f"{e}.gate_up_proj"][3, I:])
    assert torch.equal(sd4["model.layers.1.feed_forward.experts.2.down_proj.weight"], sd5[f"{e}.down_proj"][2])
    assert sd4.keys() == hf.state_dict_to_hf(ours, cfg, layout="4.x").keys()
    ours4 = hf.state_dict_from_hf(sd4, cfg)
    assert ours4.keys() == ours.keys()
    assert all(torch.equal(ours[k], ours4[k]) for k in ours)
    # and back to 5.x is the identity
    back = hf.state_dict_to_hf(ours, cfg)
    assert back.keys() == sd5.keys()
    assert all(torch.equal(back[k], sd5[k]) for k in sd5)
    assert set(back) == set(hf.hf_expected_keys(hf.config_to_hf(cfg)))


def test_missing_expert_is_an_error():
    cfg = tiny()
    sd4 = to_per_expert_layout(_hf_random_state_dict(cfg))
    sd4.pop("model.layers.3.feed_forward.experts.2.up_proj.weight")
    with pytest.raises(KeyError, match="experts"):
        hf.state_dict_from_hf(sd4, cfg)


@pytest.mark.parametrize("shard", ["1MB", "4KB"])
def test_safetensors_single_and_sharded(tmp_path, shard):
    g = torch.Generator().manual_seed(1)
    sd = {f"w{i}": torch.randn(32, 16, generator=g) for i in range(10)}  # 2 KiB each
    names = hf.save_safetensors(sd.items(), tmp_path, max_shard_size=shard)
    if shard == "1MB":
        assert names == ["model.safetensors"]
    else:
        assert "model.safetensors.index.json" in names and len(names) > 3
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sd)
        assert index["metadata"]["total_size"] == 10 * 32 * 16 * 4
    src = hf.SafetensorsSource(tmp_path)
    assert sorted(src.keys()) == sorted(sd)
    assert all(torch.equal(src.get(k), sd[k]) for k in sd)
    # rewriting the other way removes the stale files of the previous layout
    hf.save_safetensors(sd.items(), tmp_path, max_shard_size="4KB" if shard == "1MB" else "1MB")
    assert sorted(hf.SafetensorsSource(tmp_path).keys()) == sorted(sd)


def test_load_our_config_sources(tmp_path):
    cfg = tiny(layer_pattern="MD AE MD AE")
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert hf.load_our_config(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("model:\n  preset: tiny\n  hidden_size: 32\n  num_attention_heads: 4\n")
    c = hf.load_our_config(tmp_path / "c.yaml")
    assert c.hidden_size == 32 and c.vocab_size == hf.load_our_config("tiny").vocab_size
    with pytest.raises(ConfigError, match="preset"):
        hf.load_our_config("no-such-thing")


def test_cli_refuses_unexportable_config(tmp_path, capsys):
    cfg = tiny(use_rope=True)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({"model.embed_tokens.weight": torch.zeros(128, 32)}, tmp_path / "ck.pt")
    rc = hf.main(["export", str(tmp_path / "ck.pt"), str(tmp_path / "out"), "--config", str(tmp_path / "c.json")])
    assert rc == 2
    assert "use_rope" in capsys.readouterr().err


def _our_checkpoint(tmp_path, cfg):
    """A .pt checkpoint of ours (random weights, via the HF layout: no model built) and its config JSON."""
    torch.save({"model": hf.state_dict_from_hf(_hf_random_state_dict(cfg), cfg)}, tmp_path / "ck.pt")
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    return str(tmp_path / "ck.pt"), str(tmp_path / "c.json")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m jamba.hf: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("option, value", [("--tokenizer", "nope.model"), ("--tokenizer", "garbage.model"),
                                           ("--max-shard-size", "5XB")])
def test_cli_bad_export_option_is_one_line_before_anything_is_written(tmp_path, capsys, option, value):
    """A missing or unreadable tokenizer, or a shard size that is no size: one line naming the value, exit 2,
    and no (empty) output directory left behind."""
    ck, c = _our_checkpoint(tmp_path, tiny())
    (tmp_path / "garbage.model").write_text("not a sentencepiece model")
    if option == "--tokenizer":
        value = str(tmp_path / value)
    rc = hf.main(["export", ck, str(tmp_path / "out"), "--config", c, option, value])
    assert rc == 2
    err = _one_error_line(capsys)
    assert f"{option} {value!r}" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_force_balanced_run(tmp_path, capsys):
    """model.moe_force_balance=true lives only in the run's config.yaml (the checkpoint has no trace of it); HF
    would route by the router instead of round-robin, so export refuses, before writing anything."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    cfg = tiny(moe_force_balance=True)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000000010"  # trainer/checkpoint.py's layout, its config found 2 levels up
    weights = hf.state_dict_from_hf(_hf_random_state_dict(tiny()), cfg)  # the flag changes no tensor
    dcp.save({"model": weights}, checkpoint_id=str(ckpt), no_dist=True)
    OmegaConf.save(OmegaConf.create({"name": "x", "model": cfg.to_dict()}), run / "config.yaml")
    assert "moe_force_balance: true" in (run / "config.yaml").read_text()
    assert hf.main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    err = _one_error_line(capsys)
    assert "model.moe_force_balance=True" in err and "benchmarking only" in err
    assert not (tmp_path / "out").exists()


def test_cli_import_needs_a_local_hf_folder(tmp_path, capsys, monkeypatch):
    """A hub id (README's ai21labs/Jamba-v0.1) is not downloaded: say how to get the folder; one of our own
    checkpoints converts with export."""
    monkeypatch.chdir(tmp_path)
    assert hf.main(["import", "ai21labs/Jamba-v0.1", "out"]) == 2
    err = _one_error_line(capsys)
    assert "'ai21labs/Jamba-v0.1' is not a local folder" in err
    assert "hf download ai21labs/Jamba-v0.1 --local-dir DIR" in err
    step = tmp_path / "run" / "checkpoints" / "step_000000010"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    assert hf.main(["import", str(step), "out"]) == 2
    assert f"`python -m jamba.hf export {step} OUT_DIR`" in _one_error_line(capsys)
    assert hf.main(["import", str(tmp_path), "out"]) == 2
    assert "has no config.json" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dummy_prefix", [True, False])  # data/ trains without the dummy prefix
def test_tokenizer_export_matches_sentencepiece(tmp_path, dummy_prefix):
    spm = pytest.importorskip("sentencepiece")
    text = "\n".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(200))
    (tmp_path / "c.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=80,
                                   model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
                                   add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False)
    ids = hf._export_tokenizer(tmp_path / "sp.model", tmp_path / "out", vocab_size=128)
    assert ids == {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    # only trained characters; a leading space with the dummy prefix is a known Llama-tokenizer difference
    for s in ["the lazy fox 42 jumps", "the  dog over"] + ([] if dummy_prefix else [" the fox"]):
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s), s
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s))
    with pytest.raises(ConfigError, match="vocab_size"):
        hf._export_tokenizer(tmp_path / "sp.model", tmp_path / "out2", vocab_size=64)
