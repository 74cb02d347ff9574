"""Tokenizer (train / load / round trip / default built offline with a lock), DataConfig validation, the data
CLIs' one-line mistakes."""

import multiprocessing as mp
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from data import DataConfig, SourceConfig, build_dataloader, ensure_default_tokenizer, load_tokenizer
from data.corpus import stdlib_files
from data.loader import main as loader_cli
from data.tokenizer import main as tokenizer_cli
from tests.data.conftest import make_docs, write_jsonl

TRICKY = "def f(x):\n\treturn  x  # héllo wörld 😀 \u00a0 \r\n\n    日本語 12345\n"


def test_round_trip_and_pickle(tok):
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY  # byte fallback + identity normalisation: lossless
    assert max(ids) < tok.vocab_size and tok.eos_id not in ids
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(TRICKY) == ids and again.vocab_size == tok.vocab_size == 320


def test_cli_trains_on_jsonl(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", make_docs(200, seed=8))
    out = tmp_path / "t.model"
    assert tokenizer_cli(["train", "--input", str(tmp_path / "*.jsonl"), "--vocab-size", "300",
                          "--output", str(out), "--threads", "1"]) == 0
    t = load_tokenizer(str(out))
    assert t.vocab_size == 300 and (t.bos_id, t.eos_id) == (1, 2)
    assert t.decode(t.encode("alpha beta\n")) == "alpha beta\n"


@pytest.mark.parametrize("args,says", [
    (["--input", "NOPE/*.txt", "--vocab-size", "300"], "--input 'NOPE/*.txt' matches no file"),
    (["--input", "DIR", "--vocab-size", "32000"], "--vocab-size 32000: this text (its first --max-chars=4,000,000 "
                                                  "characters) gives at most"),
    (["--input", "DIR", "--vocab-size", "100"], "vocab_size=100 is too small"),
])
def test_cli_mistakes_are_one_line(tmp_path, capsys, args, says):
    """A user's mistake ends in one line and exit 2 (sentencepiece's own messages name neither cause nor flag)."""
    write_jsonl(tmp_path / "c.jsonl", make_docs(20, seed=8))
    args = [a.replace("NOPE", str(tmp_path / "nope")).replace("DIR", str(tmp_path)) for a in args]
    assert tokenizer_cli(["train", *args, "--output", str(tmp_path / "t.model"), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m data.tokenizer: error: ") and "\n" not in err, err
    assert says.replace("NOPE", str(tmp_path / "nope")) in err, err


@pytest.mark.parametrize("args,says", [
    (["--path", "NOPE/*.jsonl"], "--path 'NOPE/*.jsonl' matches no file"),
    (["--tokenizer", "NOPE.model"], "--tokenizer 'NOPE.model': no such file"),
    (["--tokenizer", "JUNK"], "--tokenizer 'JUNK' is not a sentencepiece model"),
    (["--seq-len", "0"], "--seq-len 0 must be >= 1"),
    (["--batch", "0"], "--batch 0 must be >= 1"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
])
def test_loader_cli_mistakes_are_one_line(tmp_path, capsys, monkeypatch, args, says):
    """python -m data.loader: exit 2 and one line naming the flag, before any worker starts (was a traceback)."""
    monkeypatch.setattr("data.loader.PackedLoader.__iter__", lambda self: pytest.fail("started reading"))
    (tmp_path / "junk").write_text("not a model")
    args = [a.replace("NOPE", str(tmp_path / "nope")).replace("JUNK", str(tmp_path / "junk")) for a in args]
    assert loader_cli([*args, "--batches", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m data.loader: error: ") and "\n" not in err, err
    assert says.replace("NOPE", str(tmp_path / "nope")).replace("JUNK", str(tmp_path / "junk")) in err, err


def _build_default(cache, q):
    q.put(ensure_default_tokenizer(cache, 512).fingerprint())


@pytest.fixture(scope="module")
def default_tok(tmp_path_factory):
    """Two processes race for the default tokenizer: one trains (under the lock), both load the same file."""
    cache = str(tmp_path_factory.mktemp("cache"))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_default, args=(cache, q)) for _ in range(2)]
    for p in procs:
        p.start()
    prints = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert prints[0] == prints[1]
    tok = ensure_default_tokenizer(cache, 512)
    assert tok.fingerprint() == prints[0]
    return cache, tok


def test_default_corpus_and_tokenizer_offline(default_tok):
    cache, tok = default_tok
    assert tok.vocab_size == 512
    train, val = set(stdlib_files("train")), set(stdlib_files("validation"))
    assert len(train) > 500 and 0 < len(val) < 0.05 * len(train) and not train & val
    cfg = DataConfig(tokenizer_cache_dir=cache, vocab_size=512, num_workers=0)
    assert load_tokenizer(cfg).fingerprint() == tok.fingerprint()
    loader = build_dataloader(cfg, None, seq_len=128, micro_batch_size=2, dp_rank=0, dp_world_size=1, seed=0)
    b = next(iter(loader))
    assert b["input_ids"].shape == b["targets"].shape == (2, 128) and b["input_ids"].dtype == torch.long
    assert int(b["input_ids"].max()) < 512
    text = tok.decode(b["input_ids"][0].tolist())
    assert any(w in text for w in ("def ", "import ", "class ", "return")), text[:200]
    vb = next(iter(build_dataloader(cfg, tok, seq_len=128, micro_batch_size=2, split="validation")))
    assert vb["input_ids"].shape == (2, 128)


def test_config_errors_name_key_value_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"data.sources\[0\].format='xml'.*allowed"):
        DataConfig(sources=[SourceConfig(path="x", format="xml")])
    with pytest.raises(ValueError, match=r"builtin/path/name"):
        DataConfig(sources=[SourceConfig(path="x", name="y")])
    with pytest.raises(ValueError, match=r"data.shuffle_buffer=0"):
        DataConfig(shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"weight"):
        DataConfig(sources=[{"path": "x", "weight": 0}])
    with pytest.raises(ValueError, match=r"matches no file"):  # checked when the loader is built
        build_dataloader(DataConfig(sources=[{"path": str(tmp_path / "none*.jsonl")}]), _FakeTok(),
                         seq_len=8, micro_batch_size=1)


class _FakeTok:
    vocab_size, eos_id = 10, 2


def test_hydra_structured_config(tmp_path):
    """conf/data/*.yaml merges onto the schema; to_object gives a validated DataConfig."""
    base = OmegaConf.structured(DataConfig)
    yaml = OmegaConf.create({"sources": [{"path": "/data/*.jsonl", "weight": 2.0},
                                         {"path": "/data/code", "text_field": "content"}],
                             "num_workers": 2})
    cfg = OmegaConf.to_object(OmegaConf.merge(base, yaml))
    assert isinstance(cfg, DataConfig) and isinstance(cfg.sources[1], SourceConfig)
    assert cfg.sources[1].text_field == "content" and cfg.sources[0].weight == 2.0
    with pytest.raises(Exception, match="shuffle_buffer"):
        OmegaConf.merge(base, {"shuffle_buffer": "many"})
