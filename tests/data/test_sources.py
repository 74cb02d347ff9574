"""Formats (JSONL, Parquet, text units, HF streaming), corrupt input, long documents."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data import DataConfig, SourceConfig, build_dataloader
from data.sources import FileSource, iter_file_documents, make_source
from tests.data.conftest import make_docs, write_jsonl
from tests.data.test_sharding import docs_in_stream, DOC_ID


def one_pass(cfg, tok, seq_len=32, micro_batch_size=1):
    """All documents of a validation pass (in file order, no shuffle) decoded, and the loader's counters."""
    loader = build_dataloader(cfg, tok, seq_len=seq_len, micro_batch_size=micro_batch_size, split="validation")
    batches = list(loader)
    return batches, loader.stats()


def src_kw(**kw):
    base = dict(index=0, reader=0, n_readers=1, seed=0, split="validation", hash_fraction=None,
                max_doc_chars=10**6, loop=False, stats={})
    base.update(kw)
    return base


def test_jsonl_and_parquet_sources(tmp_path, tok):
    a, b = make_docs(30, seed=1, prefix="j"), make_docs(50, seed=2, prefix="p")
    write_jsonl(tmp_path / "a.jsonl", a, field="body")
    table = pa.table({"content": b, "n": list(range(len(b)))})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=16)  # several row groups
    cfg = DataConfig(tokenizer=tok.path, sources=[SourceConfig(path=str(tmp_path / "a.jsonl"))],
                     validation_sources=[SourceConfig(path=str(tmp_path / "a.jsonl"), text_field="body"),
                                         SourceConfig(path=str(tmp_path / "b.parquet"), text_field="content")])
    batches, stats = one_pass(cfg, tok)
    got = docs_in_stream(batches, tok)
    ids = lambda docs: [DOC_ID.match(d).group(1) for d in docs]  # noqa: E731
    # a validation pass reads each source in order (mixture interleaves them); the last partial row is dropped
    got_a, got_b = [g for g in got if g[0] == "j"], [g for g in got if g[0] == "p"]
    assert got_a == ids(a)[: len(got_a)] and got_b == ids(b)[: len(got_b)]
    assert len(got) >= len(a) + len(b) - 3
    assert stats["docs"] == len(a) + len(b)
    # Parquet resume inside the second row group: exact document, by row-group seek
    spec = SourceConfig(path=str(tmp_path / "b.parquet"), text_field="content")
    src = make_source(spec, **src_kw())
    for _ in range(21):
        src.next()
    state = src.state_dict()
    nxt = make_source(spec, **src_kw())
    nxt.load_state_dict(state)
    assert nxt.next() == b[21] == src.next()


def test_text_units(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\n\ntwo a\ntwo b\n\nthree\n")
    def all_docs(unit):
        src = FileSource([str(tmp_path / "t.txt")], fmt="auto", text_field="text", text_unit=unit,
                         label="t", **src_kw())
        out = []
        while (t := src.next()) is not None:
            out.append(t)
        return out, src.stats
    assert all_docs("file")[0] == ["one\n\n\ntwo a\ntwo b\n\nthree\n"]
    assert all_docs("paragraph")[0] == ["one", "two a\ntwo b", "three"]
    docs, stats = all_docs("line")
    assert docs == ["one", "two a", "two b", "three"] and stats["skipped_empty"] == 3


def test_corrupt_inputs_are_skipped_and_counted(tmp_path, tok):
    good = make_docs(20, seed=9, prefix="g")
    with open(tmp_path / "a.jsonl", "wb") as f:
        for i, d in enumerate(good):
            f.write((json.dumps({"text": d}) + "\n").encode())
            if i == 3:
                f.write(b'{"text": "broken\n')                    # invalid JSON
                f.write(b"\n   \n")                                 # blank lines
                f.write(b'{"other": "no text field"}\n')           # missing field
                f.write(b'{"text": 42}\n')                          # not a string
                f.write(b'{"text": "bad \xff\xfe bytes"}\n')        # non-UTF-8
    (tmp_path / "b_empty.txt").write_bytes(b"")
    (tmp_path / "c_latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    (tmp_path / "d_bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "e_trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "g999: ok"}\n' * 50)[:40])
    long_doc = "g100: " + "long line of text\n" * 20_000  # 360 KB, split into pieces
    (tmp_path / "f_long.txt").write_text(long_doc)
    cfg = DataConfig(tokenizer=tok.path, validation_sources=[SourceConfig(path=str(tmp_path))],
                     max_doc_chars=100_000)
    batches, stats = one_pass(cfg, tok, seq_len=256, micro_batch_size=2)
    got = docs_in_stream(batches, tok)
    assert set(DOC_ID.match(d).group(1) for d in good) <= set(got)
    assert stats["skipped_json"] == 1
    assert stats["skipped_field"] == 2
    assert stats["skipped_utf8"] == 2           # the JSONL record and the latin-1 file
    assert stats["skipped_empty"] == 3          # two blank lines + the empty file
    assert stats["skipped_file"] == 2           # corrupt parquet, truncated gzip
    assert stats["split_docs"] == 1
    # the truncated gzip yields the records before the cut, then counts as skipped_file
    readable = sum(t is not None for _, t in iter_file_documents(str(tmp_path / "e_trunc.jsonl.gz")))
    assert stats["docs"] == len(good) + 4 + readable  # + 4 pieces of the long document


def test_ten_megabyte_document_is_split_and_resumable(tmp_path):
    text = "".join(f"line {i} " + "x" * 90 + "\n" for i in range(100_000))  # ~10 MB, one document
    (tmp_path / "big.txt").write_text(text)
    mk = lambda: FileSource([str(tmp_path / "big.txt")], fmt="auto", text_field="text",  # noqa: E731
                            text_unit="file", label="big", **src_kw(max_doc_chars=1_000_000))
    src = mk()
    pieces = [src.next() for _ in range(4)]
    state = src.state_dict()
    rest = []
    while (t := src.next()) is not None:
        rest.append(t)
    assert "".join(pieces + rest) == text
    assert all(len(p) <= 1_000_000 for p in pieces + rest) and len(pieces + rest) >= 10
    assert src.stats["split_docs"] == 1
    again = mk()
    again.load_state_dict(state)
    assert again.next() == rest[0]


def test_hf_streaming_source_resumes(tmp_path):
    """`name=` streams through HF datasets (here a local dataset directory: no network)."""
    d = tmp_path / "ds"
    d.mkdir()
    docs = make_docs(30, seed=4, prefix="h")
    write_jsonl(d / "train.jsonl", docs)
    spec = SourceConfig(name=str(d))
    src = make_source(spec, **src_kw(split="train", loop=True))
    head = [src.next() for _ in range(7)]
    state = src.state_dict()
    tail = [src.next() for _ in range(30)]  # crosses into the second epoch
    assert head + tail[:23] == docs and tail[23:] == docs[:7]
    again = make_source(spec, **src_kw(split="train", loop=True))
    again.load_state_dict(state)
    assert [again.next() for _ in range(30)] == tail


def test_embedded_corpus_skips_misencoded_files_quietly(tmp_path, caplog, monkeypatch):
    """The stdlib ships deliberately mis-encoded test files: the builtin corpus counts them (skipped_utf8) without
    a warning per file and process; a user's own files still warn."""
    import logging

    import data.sources as sources

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b_latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    monkeypatch.setattr(sources, "stdlib_files", lambda *a, **k: (str(tmp_path / "a.py"), str(tmp_path / "b_latin1.py")))
    monkeypatch.setattr(sources, "_warned", {})
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        stats = {}
        src = make_source(SourceConfig(builtin="python_stdlib"), **src_kw(stats=stats))
        assert [src.next(), src.next()] == ["x = 1\n", None]
        assert stats["skipped_utf8"] == 1 and not caplog.records
        own = {}
        src = make_source(SourceConfig(path=str(tmp_path)), **src_kw(stats=own))
        assert [src.next(), src.next()] == ["x = 1\n", None]
        assert own["skipped_utf8"] == 1 and len(caplog.records) == 1 and "not UTF-8" in caplog.text


def test_validation_pass_pads_its_last_batch(tmp_path, tok):
    """The rows that do not fill a last validation batch come in one batch of the same shape, filled with copies
    of its rows whose targets are ignored, so a split smaller than one micro-batch still gives a loss."""
    from jamba.loss import IGNORE_INDEX

    write_jsonl(tmp_path / "v.jsonl", make_docs(12, seed=3, prefix="v"), field="text")
    cfg = DataConfig(tokenizer=tok.path, sources=[SourceConfig(path=str(tmp_path / "v.jsonl"))],
                     validation_sources=[SourceConfig(path=str(tmp_path / "v.jsonl"))])
    rows, _ = one_pass(cfg, tok, seq_len=16, micro_batch_size=1)
    n = len(rows)
    assert n >= 3
    for mbs in (n - 1, n + 3):  # one full batch and one of 1 row; one batch of n rows and 3 padding rows
        batches, _ = one_pass(cfg, tok, seq_len=16, micro_batch_size=mbs)
        assert len(batches) == -(-n // mbs) and all(b["input_ids"].shape == (mbs, 16) for b in batches)
        last_start = (len(batches) - 1) * mbs  # the last batch's first row
        for key in ("input_ids", "targets", "doc_ids"):
            got, want = torch.cat([b[key] for b in batches]), torch.cat([r[key] for r in rows])
            assert torch.equal(got[:n], want) and all(b[key].is_contiguous() for b in batches), key
            if key == "targets":
                assert (got[n:] == IGNORE_INDEX).all()
            else:  # the last batch's rows again, in order
                again = [last_start + i % (n - last_start) for i in range(len(got) - n)]
                assert torch.equal(got[n:], want[again]), key
