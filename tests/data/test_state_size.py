"""The loader's state stays small whatever the input (it travels with every batch from a DataLoader worker and
is saved per rank), and resume stays exact: buffered documents are stored as addresses and read again."""

import json
import pickle
import random

import pytest

from data import DataConfig, SourceConfig, build_dataloader
from tests.data.conftest import WORDS, make_docs, write_jsonl
from tests.data.test_resume import assert_same, checkpoint_roundtrip, take

MAX_STATE = 32 * 1024  # bytes; the old state carried the buffered tokens: ~1.5 MB here, ~64 MB for 60 MB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Ordinary documents, plus one ~1 MB single-line JSON document (split into 20 pieces of <= 50,000 chars)."""
    d = tmp_path_factory.mktemp("huge")
    docs = make_docs(30, seed=11, prefix="n")
    rng = random.Random(0)
    huge = "huge0: " + " ".join(rng.choice(WORDS) for _ in range(200_000))
    write_jsonl(d / "a.jsonl", docs[:15])
    with open(d / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": huge}) + "\n")
    write_jsonl(d / "b.jsonl", docs[15:])
    (d / "t.txt").write_text("\n\n".join(docs[:10]))  # paragraphs: re-read by byte offset
    return d


def make(corpus, tok, workers):
    return DataConfig(sources=[SourceConfig(path=str(corpus / "*.jsonl"), weight=3.0),
                               SourceConfig(path=str(corpus / "t.txt"), text_unit="paragraph")],
                      tokenizer=tok.path, num_workers=workers, shuffle_buffer=64, max_doc_chars=50_000,
                      validation_fraction=0.0, prefetch_factor=2)


@pytest.mark.parametrize("workers", [0, 1])
def test_state_small_and_resume_exact_with_a_huge_document(corpus, tok, workers):
    cfg = make(corpus, tok, workers)
    kw = dict(seq_len=256, micro_batch_size=4, seed=5)
    n = 60
    ref = take(build_dataloader(cfg, tok, **kw), n)
    for stop in (2, 23, 41):
        first = build_dataloader(cfg, tok, **kw)
        a = take(first, stop)
        state = first.state_dict()
        size = len(pickle.dumps(state))
        pieces = sum(1 for g in state["workers"] for _, w in g["readers"]
                     for e in w["buffer"] + [p[0] for p in w["pending"]]
                     if e[0] == "at" and e[2][3] > 0)  # entries inside the huge document
        assert size < MAX_STATE, f"{size:,} bytes of loader state after batch {stop}"
        second = build_dataloader(cfg, tok, **kw)
        second.load_state_dict(checkpoint_roundtrip(state))
        b = take(second, n - stop)
        assert_same(ref, a + b)
        if stop == 2:
            assert pieces > 0, "the huge document should be in the buffer by now"


def test_changed_file_is_refused_not_silently_different(tmp_path, tok):
    """A buffered document that reads back differently (the file changed) fails the resume, naming it."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(40, seed=3, prefix="c"))
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], tokenizer=tok.path, num_workers=0,
                     shuffle_buffer=16, validation_fraction=0.0)
    loader = build_dataloader(cfg, tok, seq_len=32, micro_batch_size=2)
    take(loader, 3)
    state = loader.state_dict()
    docs = make_docs(40, seed=3, prefix="c")
    write_jsonl(path, [d.upper() for d in docs])  # same lines, other text
    again = build_dataloader(cfg, tok, seq_len=32, micro_batch_size=2)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        again.load_state_dict(state)
        take(again, 1)
