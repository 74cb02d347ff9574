"""Bad data is counted once per line (not again in every epoch), by one reader, and warned about 5 times per
kind before one line says the rest go to the counters."""

import logging

import pytest

import data.sources as sources
from data import DataConfig, SourceConfig, build_dataloader
from data.sources import make_source
from tests.data.conftest import make_docs, write_jsonl

N_BAD = 15


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(20, seed=5, prefix="c")
    write_jsonl(tmp_path / "a.jsonl", docs[:10])
    write_jsonl(tmp_path / "b.jsonl", docs[10:])
    with open(tmp_path / "a.jsonl", "a") as f:
        for i in range(N_BAD):
            f.write(f'{{"text": "broken {i}\n')
    return tmp_path


@pytest.mark.parametrize("n_readers", [1, 3])  # 3 readers > 2 files: every reader scans every line
def test_each_bad_line_counted_once_over_epochs_and_readers(corpus, n_readers):
    spec = SourceConfig(path=str(corpus / "*.jsonl"))
    total, epochs = 0, []
    for r in range(n_readers):
        stats = {}
        src = make_source(spec, index=0, reader=r, n_readers=n_readers, seed=0, split="train",
                          hash_fraction=None, max_doc_chars=10**6, loop=True, stats=stats)
        for _ in range(200):  # several epochs of this reader's documents
            src.next()
        epochs.append(src.state["epoch"])
        total += stats.get("skipped_json", 0)
    assert min(epochs) >= 3, epochs
    assert total == N_BAD


def test_warnings_stop_after_five_and_say_so(corpus, tok, caplog, monkeypatch):
    monkeypatch.setattr(sources, "_warned", {})
    cfg = DataConfig(sources=[SourceConfig(path=str(corpus / "*.jsonl"))], tokenizer=tok.path, num_workers=0,
                     validation_fraction=0.0, shuffle_buffer=4)
    loader = build_dataloader(cfg, tok, seq_len=32, micro_batch_size=2)
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        for _ in range(100):
            next(it)
    warned = [m for m in caplog.messages if "invalid JSON" in m]
    suppressed = [m for m in caplog.messages if "further skipped_json warnings suppressed" in m]
    assert len(warned) == 5 and len(suppressed) == 1, caplog.messages
    assert loader.stats()["skipped_json"] == N_BAD
