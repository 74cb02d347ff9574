"""Document sources with an exact, resumable position: local files (text / JSONL / Parquet) and HF hub datasets.

A source instance belongs to one *reader* (one of the run's `data.readers` streams, data/readers.py) and yields
that reader's
documents as strings, forever (epoch after epoch, file order reshuffled per epoch) or once (validation).

Sharding: with at least as many files as readers, files are dealt to readers (file i -> reader i % R);
otherwise every reader scans every file and keeps documents j with j % R == reader. Either way each
document goes to exactly one reader per epoch.

Position: (epoch, index in the epoch's file order, next raw document index in the file, pieces of a long
document already emitted). Resuming re-opens one file and skips to that document (Parquet: by row group).

Local files are read by our own readers rather than `datasets.load_dataset(..., streaming=True)`: building a
streaming dataset costs about a second per call here, and its JSON reader fails a whole chunk on one bad line,
where ours skips and counts the line. Hub datasets (`name=`) do stream through HF `datasets`, with their
position from `IterableDataset.state_dict()` (we keep our own shuffle buffer, which HF does not restore).

Bad input never raises: non-UTF-8 documents, invalid JSON lines, missing/non-string text fields, empty and
whitespace-only documents, and unreadable files are skipped and counted (`skipped_*` counters); documents
longer than `max_doc_chars` are split into pieces (`split_docs`). Each bad line is counted once: by the reader
that owns it, in the source's first epoch (later epochs skip the same lines silently). The counters reach
metrics.jsonl and the log line; warnings stop after the first 5 of a kind per process, saying so.
"""

from __future__ import annotations

import copy
import glob
import gzip
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from data.corpus import split_of, stdlib_files

log = logging.getLogger(__name__)

TEXT_EXTS = (".txt", ".md", ".py", ".rst", ".text", ".tex", ".c", ".h", ".js", ".html")
WARN_LIMIT = 5
_warned: Dict[str, int] = {}


class Skips(dict):
    """Skip counters of one document being read, with its warnings held back until the reader knows whether
    the document is its own (and in its first epoch): `keep(into)` counts and warns, `clear()` forgets.
    quiet=True: only counts (the embedded corpus's deliberately mis-encoded stdlib test files, the
    pre-flight scan), so no warning repeats in every worker of every run."""

    def __init__(self, quiet: bool = False):
        super().__init__()
        self.quiet = quiet
        self.pending: List[Tuple[str, str, tuple]] = []

    def keep(self, into: Dict[str, int]) -> None:
        for k, v in self.items():
            into[k] = into.get(k, 0) + v
        if not self.quiet:
            for reason, msg, args in self.pending:
                _log_skip(reason, msg, args)
        self.clear()

    def clear(self) -> None:
        super().clear()
        self.pending = []


def _log_skip(reason: str, msg: str, args: tuple) -> None:
    """The first WARN_LIMIT warnings of each reason in this process, then one line saying that they stop."""
    n = _warned[reason] = _warned.get(reason, 0) + 1
    if n <= WARN_LIMIT:
        log.warning("data: " + msg + f" (skipped; {reason})", *args)
    if n == WARN_LIMIT:
        log.warning("data: further %s warnings suppressed; counts in metrics.jsonl and the log line", reason)


def _warn(stats: Optional[Dict[str, int]], reason: str, msg: str, *args) -> None:
    """Count `reason` in stats and warn (a Skips holds the warning back for its reader to decide)."""
    if stats is not None:
        stats[reason] = stats.get(reason, 0) + 1
    if isinstance(stats, Skips):
        stats.pending.append((reason, msg, args))
    else:
        _log_skip(reason, msg, args)


def detect_format(path: str) -> str:
    p = path.lower()
    if p.endswith(".gz"):
        p = p[:-3]
    if p.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, stats, where: str) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _warn(stats, "skipped_utf8", "%s: not UTF-8 (%s)", where, e.reason)
        return None
    if not text.strip():
        if stats is not None:
            stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
        return None
    return text


def iter_file_documents(path: str, *, fmt: str = "auto", text_field: str = "text", text_unit: str = "file",
                        start: int = 0, stats: Optional[Dict[str, int]] = None, offset: Optional[int] = None,
                        with_offsets: bool = False) -> Iterator[Tuple]:
    """Yield (raw document index, text or None if skipped) from index `start` on. Never raises on bad data:
    an unreadable file is counted as `skipped_file` and yields nothing more. Skipped documents are counted in
    `stats` and warned about (a `Skips` holds the warnings back; `Skips(quiet=True)` only counts).

    with_offsets: yield (index, text, byte offset of the document in the file or None) instead; `offset`, the
    byte offset of document `start` when known, lets text and JSONL files seek there instead of scanning."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "parquet":
            it = _iter_parquet(path, text_field, start, stats)
        elif fmt == "jsonl":
            it = _iter_jsonl(path, text_field, start, stats, offset)
        else:
            it = _iter_text(path, text_unit, start, stats, offset)
        for j, text, at in it:
            yield (j, text, at) if with_offsets else (j, text)
    except (OSError, EOFError, ValueError) as e:  # unreadable, truncated gzip, corrupt parquet, ...
        _warn(stats, "skipped_file", "%s: unreadable (%s: %s)", path, type(e).__name__, e)


def _lines(f, start: int, offset: Optional[int]) -> Iterator[Tuple[int, int, bytes]]:
    """(line index, byte offset, line) of a binary file; from line `start` at byte `offset` when given."""
    j, pos = 0, 0
    if offset is not None and start > 0:
        f.seek(offset)
        j, pos = start, offset
    for line in f:
        yield j, pos, line
        j, pos = j + 1, pos + len(line)


def _iter_text(path, unit, start, stats, offset=None):
    if unit == "file":
        if start == 0:
            with _open(path) as f:
                yield 0, _decode(f.read(), stats, path), 0
        return
    with _open(path) as f:
        if unit == "line":
            for j, pos, line in _lines(f, start, offset):
                if j >= start:
                    yield j, _decode(line.rstrip(b"\r\n"), stats, f"{path}:{j + 1}"), pos
            return
        # paragraph: blank-line separated blocks; `offset` is where paragraph `start` begins
        j, para, at = (start, [], offset) if offset is not None and start > 0 else (0, [], 0)
        if offset is not None and start > 0:
            f.seek(offset)
        pos = at
        for line in f:
            if line.strip():
                if not para:
                    at = pos
                para.append(line)
            elif para:
                if j >= start:
                    yield j, _decode(b"".join(para).rstrip(b"\r\n"), stats, f"{path} paragraph {j}"), at
                j, para = j + 1, []
            pos += len(line)
        if para and j >= start:
            yield j, _decode(b"".join(para).rstrip(b"\r\n"), stats, f"{path} paragraph {j}"), at


def _iter_jsonl(path, field, start, stats, offset=None):
    with _open(path) as f:
        for j, pos, line in _lines(f, start, offset):
            if j < start:
                continue
            where = f"{path}:{j + 1}"
            if not line.strip():
                if stats is not None:
                    stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
                yield j, None, pos
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError as e:
                _warn(stats, "skipped_utf8", "%s: not UTF-8 (%s)", where, e.reason)
                yield j, None, pos
                continue
            except ValueError as e:
                _warn(stats, "skipped_json", "%s: invalid JSON line (%s)", where, str(e)[:80])
                yield j, None, pos
                continue
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                _warn(stats, "skipped_field", "%s: no string field %r", where, field)
                yield j, None, pos
                continue
            if not text.strip():
                if stats is not None:
                    stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
                yield j, None, pos
                continue
            yield j, text, pos


def _iter_parquet(path, field, start, stats):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        _warn(stats, "skipped_file", "%s: no column %r (columns: %s)", path, field, pf.schema_arrow.names)
        return
    row0 = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row0 + n <= start:  # seek: skip whole row groups before the resume point
            row0 += n
            continue
        for batch in pf.iter_batches(row_groups=[g], columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                j, row0 = row0, row0 + 1
                if j < start:
                    continue
                if not isinstance(text, str) or not text.strip():
                    reason = "skipped_empty" if isinstance(text, str) or text is None else "skipped_field"
                    if stats is not None:
                        stats[reason] = stats.get(reason, 0) + 1
                    yield j, None, None
                    continue
                yield j, text, None


def expand_path(path: str) -> List[str]:
    """A file, a directory (all files below it), or a glob (`**` recursive) -> sorted file list."""
    p = os.path.expanduser(path)
    if os.path.isdir(p):
        return sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and not f.name.startswith("."))
    return sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))


def remaining_pieces(text: str, max_chars: int, piece: int, stats: Dict[str, int]) -> List[str]:
    """The pieces of a too-long document from `piece` on (resume inside it); counts the split once."""
    if piece == 0:
        stats["split_docs"] = stats.get("split_docs", 0) + 1
    return split_text(text, max_chars)[piece:]


def split_text(text: str, max_chars: int) -> List[str]:
    """Split a long document into pieces of at most max_chars, preferring newline boundaries."""
    pieces, i = [], 0
    while i < len(text):
        j = min(len(text), i + max_chars)
        if j < len(text):
            nl = text.rfind("\n", i + max_chars // 2, j)
            if nl > 0:
                j = nl + 1
        pieces.append(text[i:j])
        i = j
    return pieces


class Source:
    """Base: `next()` -> str or None (exhausted, only when loop=False); `state_dict()` / `load_state_dict()`."""

    def __init__(self, label: str, reader: int, n_readers: int, seed: int, index: int, split: str,
                 hash_fraction: Optional[float], max_doc_chars: int, loop: bool, stats: Dict[str, int]):
        self.label, self.reader, self.n_readers, self.seed, self.index = label, reader, n_readers, seed, index
        self.split, self.hash_fraction, self.max_doc_chars, self.loop = split, hash_fraction, max_doc_chars, loop
        self.stats = stats
        self.epoch_docs = 0  # documents this reader got in the current epoch (to detect an empty shard)
        self.last_address: Optional[tuple] = None
        """Where the text next() returned can be read again (`read_many`), or None if this source cannot."""

    def _keep(self, text: str) -> bool:
        """Held-out documents by content hash: train keeps the rest, validation keeps only them."""
        if self.hash_fraction is None:
            return True
        return split_of(text, self.hash_fraction) == self.split

    def read_many(self, addresses: Sequence[tuple]) -> List[str]:
        """The texts at these `last_address` values (a resume rebuilds its shuffle buffer from them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot re-read documents")

    def _no_docs_error(self) -> ValueError:
        return ValueError(
            f"data source {self.label} gave reader {self.reader} of {self.n_readers} (rank x worker) no "
            f"{self.split} documents in a whole epoch (counters: {dict(self.stats)}); fix: check the path and "
            f"text_field, or use fewer data-parallel ranks x data.num_workers than the corpus has documents")


class FileSource(Source):
    def __init__(self, files: Sequence[str], *, fmt: str, text_field: str, text_unit: str, warn: bool = True,
                 **kw):
        super().__init__(**kw)
        self.fmt, self.text_field, self.text_unit = fmt, text_field, text_unit
        if len(files) >= self.n_readers:  # deal whole files
            self.files, self.stride, self.offset = list(files[self.reader::self.n_readers]), 1, 0
        else:  # every reader scans every file, keeps every R-th document
            self.files, self.stride, self.offset = list(files), self.n_readers, self.reader
        self.state = {"epoch": 0, "file_pos": 0, "doc": 0, "piece": 0}
        self._order: Optional[List[int]] = None
        self._it: Optional[Iterator] = None
        self._pieces: List[str] = []
        self._doc_offset: Optional[int] = None  # byte offset of the document being read (None: Parquet)
        self._scratch = Skips(quiet=not warn)

    def _epoch_order(self, epoch: Optional[int] = None) -> List[int]:
        order = list(range(len(self.files)))
        if self.loop:  # training: a new file order every epoch
            epoch = self.state["epoch"] if epoch is None else epoch
            random.Random(f"{self.seed}/{self.index}/{self.reader}/{epoch}").shuffle(order)
        return order

    def next(self) -> Optional[str]:
        st = self.state
        while True:
            if self._pieces:  # the rest of a long document
                text = self._pieces.pop(0)
                self.last_address = (st["epoch"], st["file_pos"], st["doc"], st["piece"], self._doc_offset)
                st["piece"] += 1
                if not self._pieces:
                    st["doc"], st["piece"] = st["doc"] + 1, 0
                return text
            if self._order is None:
                self._order = self._epoch_order()
            if st["file_pos"] >= len(self._order):  # end of epoch
                if self.epoch_docs == 0 and self.loop:
                    raise self._no_docs_error()
                if not self.loop:
                    return None
                st.update(epoch=st["epoch"] + 1, file_pos=0, doc=0, piece=0)
                self._order, self._it, self.epoch_docs = None, None, 0
                continue
            if self._it is None:
                path = self.files[self._order[st["file_pos"]]]
                self._it = iter_file_documents(path, fmt=self.fmt, text_field=self.text_field,
                                               text_unit=self.text_unit, start=st["doc"], stats=self._scratch,
                                               with_offsets=True)
            nxt = next(self._it, None)
            j = nxt[0] if nxt is not None else -1
            mine = (self._order[st["file_pos"]] + j) % self.stride == self.offset
            if self._scratch:  # skip counters: only the reader that owns the document (or file) counts them,
                # once: in the first epoch (later epochs meet the same bad lines again)
                if st["epoch"] == 0 and (mine if nxt is not None else self.offset == 0):
                    self._scratch.keep(self.stats)
                self._scratch.clear()
            if nxt is None:  # end of file
                st.update(file_pos=st["file_pos"] + 1, doc=0, piece=0)
                self._it = None
                continue
            text, self._doc_offset = nxt[1], nxt[2]
            st["doc"] = j
            if text is None or not mine or not self._keep(text):
                st["doc"], st["piece"] = j + 1, 0
                continue
            self.epoch_docs += 1
            if len(text) > self.max_doc_chars:
                self._pieces = remaining_pieces(text, self.max_doc_chars, st["piece"],
                                                self.stats if st["epoch"] == 0 else {})
                continue
            self.last_address = (st["epoch"], st["file_pos"], j, 0, self._doc_offset)
            st["doc"], st["piece"] = j + 1, 0
            return text

    def read_many(self, addresses: Sequence[tuple]) -> List[str]:
        """Texts at (epoch, file position, document index, piece, byte offset) addresses; each document read
        once (the pieces of one long document share it), text and JSONL files by seeking to the offset."""
        docs: Dict[tuple, Optional[str]] = {}
        for epoch, file_pos, doc, _, offset in addresses:
            key = (int(epoch), int(file_pos), int(doc))
            if key in docs:
                continue
            path = self.files[self._epoch_order(key[0])[key[1]]]
            found = None
            for j, text, _ in iter_file_documents(path, fmt=self.fmt, text_field=self.text_field,
                                                   text_unit=self.text_unit, start=key[2], stats=Skips(True),
                                                   offset=offset, with_offsets=True):
                if j == key[2]:
                    found = text
                break
            if found is None:
                raise ValueError(f"data source {self.label}: document {key[2]} of {path} (epoch {key[0]}) cannot be "
                                 f"read again to resume; the file changed since the checkpoint. Fix: restore it, or "
                                 f"start the data loaders afresh (a new run directory)")
            docs[key] = found
        out = []
        for epoch, file_pos, doc, piece, _ in addresses:
            text = docs[(int(epoch), int(file_pos), int(doc))]
            out.append(split_text(text, self.max_doc_chars)[piece] if len(text) > self.max_doc_chars else text)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.state, epoch_docs=self.epoch_docs)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.state = {k: int(sd[k]) for k in ("epoch", "file_pos", "doc", "piece")}
        self.epoch_docs = int(sd.get("epoch_docs", 1))
        self._order, self._it, self._pieces = None, None, []


class HubSource(Source):
    """An HF hub dataset (or a local dataset directory) streamed with `datasets`; split across readers with
    `split_dataset_by_node`; exact position from the IterableDataset's own state_dict."""

    def __init__(self, name: str, *, subset: Optional[str], hf_split: str, text_field: str, **kw):
        super().__init__(**kw)
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        ds = load_dataset(name, subset, split=hf_split, streaming=True)
        self.ds = split_dataset_by_node(ds, rank=self.reader, world_size=self.n_readers)
        self.text_field = text_field
        self.state: Dict[str, Any] = {"epoch": 0, "hf": None, "piece": 0}
        self._it = None
        self._pieces: List[str] = []

    def next(self) -> Optional[str]:
        st = self.state
        while True:
            if self._pieces:
                text = self._pieces.pop(0)
                st["piece"] += 1
                if not self._pieces:
                    st["piece"], st["hf"] = 0, self._hf_after
                return text
            if self._it is None:
                if st["hf"] is not None:
                    self.ds.load_state_dict(copy.deepcopy(st["hf"]))
                else:
                    self.ds.set_epoch(st["epoch"])
                self._it = iter(self.ds)
            rec = next(self._it, None)
            if rec is None:
                if self.epoch_docs == 0 and self.loop:
                    raise self._no_docs_error()
                if not self.loop:
                    return None
                st.update(epoch=st["epoch"] + 1, hf=None, piece=0)
                self._it, self.epoch_docs = None, 0
                continue
            after = copy.deepcopy(self.ds.state_dict())
            text = rec.get(self.text_field)
            if not isinstance(text, str) or not text.strip():
                if st["epoch"] == 0:  # counted once, not again in every epoch
                    _warn(self.stats, "skipped_field" if not isinstance(text, str) else "skipped_empty",
                          "%s: record without text in field %r", self.label, self.text_field)
                st["hf"] = after
                continue
            if not self._keep(text):
                st["hf"] = after
                continue
            self.epoch_docs += 1
            if len(text) > self.max_doc_chars:
                self._pieces = remaining_pieces(text, self.max_doc_chars, st["piece"],
                                                self.stats if st["epoch"] == 0 else {})
                self._hf_after = after
                continue
            st["hf"] = after
            return text

    def state_dict(self) -> Dict[str, Any]:
        return dict(copy.deepcopy(self.state), epoch_docs=self.epoch_docs)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.state = {"epoch": int(sd["epoch"]), "hf": copy.deepcopy(sd["hf"]), "piece": int(sd["piece"])}
        self.epoch_docs = int(sd.get("epoch_docs", 1))
        self._it, self._pieces = None, []


def make_source(spec: Any, *, index: int, reader: int, n_readers: int, seed: int, split: str,
                hash_fraction: Optional[float], max_doc_chars: int, loop: bool, stats: Dict[str, int]) -> Source:
    """Build a reader's Source from a SourceConfig (builtin | path | name)."""
    kw = dict(reader=reader, n_readers=n_readers, seed=seed, index=index, split=split,
              max_doc_chars=max_doc_chars, loop=loop, stats=stats)
    if spec.builtin:
        # The embedded corpus splits by file path (cheap: held-out files are never opened by training). The
        # stdlib holds a few deliberately mis-encoded test files (test_source_encoding.py, encoded_modules/):
        # counted as skipped_utf8 without a warning, which would otherwise repeat in every worker of every run.
        files = stdlib_files(split, hash_fraction) if hash_fraction is not None else stdlib_files("all")
        return FileSource(files, fmt="text", text_field="text", text_unit="file", label="builtin:python_stdlib",
                          hash_fraction=None, warn=False, **kw)
    if spec.path:
        files = expand_path(spec.path)
        if not files:
            raise ValueError(f"data source path={spec.path!r} matches no file; fix: give an existing file, "
                             f"directory or glob (e.g. 'corpus/**/*.jsonl')")
        return FileSource(files, fmt=spec.format, text_field=spec.text_field, text_unit=spec.text_unit,
                          label=f"path:{spec.path}", hash_fraction=hash_fraction, **kw)
    return HubSource(spec.name, subset=spec.subset, hf_split=spec.split, text_field=spec.text_field,
                     label=f"name:{spec.name}", hash_fraction=hash_fraction, **kw)
