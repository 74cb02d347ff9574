"""Data-parallel ranks x workers see disjoint documents that together cover the corpus, once per epoch."""

import re

import pytest
import torch

from data import DataConfig, SourceConfig, build_dataloader
from data.sources import make_source
from tests.data.conftest import make_docs, write_jsonl

DOC_ID = re.compile(r"^([a-z]+\d+):")


def epoch_docs(src):
    """Documents a training source yields in its first epoch."""
    out = []
    while True:
        text = src.next()
        if src.state["epoch"] > 0:
            return out
        out.append(DOC_ID.match(text).group(1))


@pytest.mark.parametrize("layout", ["many_files", "one_file"])
def test_readers_partition_the_corpus(tmp_path, layout):
    docs = make_docs(60, seed=5, prefix="d")
    if layout == "many_files":  # files dealt to readers
        for i in range(6):
            write_jsonl(tmp_path / f"part{i}.jsonl", docs[i * 10:(i + 1) * 10])
    else:  # fewer files than readers: every reader strides over the documents
        write_jsonl(tmp_path / "all.jsonl", docs)
    first = sorted(tmp_path.glob("*.jsonl"))[0]
    with open(first, "a") as f:
        f.write("{not json\n")  # counted once over all readers, by the reader that owns that line
    spec = SourceConfig(path=str(tmp_path / "*.jsonl"))
    all_ids = {DOC_ID.match(d).group(1) for d in docs}
    n_readers = 4  # e.g. 2 ranks x 2 workers
    kw = dict(index=0, n_readers=n_readers, seed=3, hash_fraction=0.2, max_doc_chars=10**6)
    train, bad = [], 0
    for r in range(n_readers):
        stats = {}
        got = epoch_docs(make_source(spec, reader=r, split="train", loop=True, stats=stats, **kw))
        bad += stats.get("skipped_json", 0)
        assert len(got) == len(set(got)), "a document repeated within an epoch"
        train.append(set(got))
        assert got, f"reader {r} got nothing"
    for r in range(n_readers):
        for q in range(r):
            assert not train[r] & train[q], f"readers {q} and {r} share documents"
    assert bad == 1
    val = set()
    for r in range(n_readers):
        src = make_source(spec, reader=r, split="validation", loop=False, stats={}, **kw)
        while (t := src.next()) is not None:
            val.add(DOC_ID.match(t).group(1))
    union = set().union(*train)
    assert not union & val
    assert union | val == all_ids
    assert 0 < len(val) < 0.4 * len(all_ids)


def docs_in_stream(batches, tok):
    ids = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    out, cur = [], []
    for t in ids:
        if t == tok.eos_id:
            m = DOC_ID.match(tok.decode(cur))
            if m:
                out.append(m.group(1))
            cur = []
        else:
            cur.append(t)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_get_disjoint_documents(tmp_path, tok, workers):
    for i in range(8):
        write_jsonl(tmp_path / f"p{i}.jsonl", make_docs(40, seed=i, prefix="f" + chr(97 + i)))
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "*.jsonl"))], tokenizer=tok.path,
                     num_workers=workers, shuffle_buffer=4, validation_fraction=0.0, prefetch_factor=2)
    seen = []
    for rank in range(2):
        it = iter(build_dataloader(cfg, tok, seq_len=64, micro_batch_size=2, dp_rank=rank, dp_world_size=2, seed=0))
        docs = docs_in_stream([next(it) for _ in range(30)], tok)
        assert len(docs) > 10 and len(docs) == len(set(docs))
        seen.append(set(docs))
    assert not seen[0] & seen[1]
