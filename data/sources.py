"""Document sources with an exact, resumable position: local files (text / JSONL / Parquet) and HF hub datasets.

A source instance belongs to one *reader* (a data-parallel rank x DataLoader worker) and yields that reader's
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
whitespace-only documents, and unreadable files are skipped and counted (`skipped_*` counters) with a
rate-limited warning; documents longer than `max_doc_chars` are split into pieces (`split_docs`).
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from data.corpus import split_of, stdlib_files, stdlib_root

log = logging.getLogger(__name__)

TEXT_EXTS = (".txt", ".md", ".py", ".rst", ".text", ".tex", ".c", ".h", ".js", ".html")
_warned: Dict[str, int] = {}


def _warn(stats: Optional[Dict[str, int]], reason: str, msg: str, *args, warn: bool = True) -> None:
    """Count `reason`; log the first 5 occurrences and then every 1000th (per process) unless warn=False."""
    if stats is not None:
        stats[reason] = stats.get(reason, 0) + 1
    if not warn:
        return
    n = _warned[reason] = _warned.get(reason, 0) + 1
    if n <= 5 or n % 1000 == 0:
        log.warning("data: " + msg + f" (skipped; {reason} #{n} in this process)", *args)


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


def _decode(raw: bytes, stats, where: str, warn: bool = True) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _warn(stats, "skipped_utf8", "%s: not UTF-8 (%s)", where, e.reason, warn=warn)
        return None
    if not text.strip():
        if stats is not None:
            stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
        return None
    return text


def iter_file_documents(path: str, *, fmt: str = "auto", text_field: str = "text", text_unit: str = "file",
                        start: int = 0, stats: Optional[Dict[str, int]] = None, warn: bool = True
                        ) -> Iterator[Tuple[int, Optional[str]]]:
    """Yield (raw document index, text or None if skipped) from index `start` on. Never raises on bad data:
    an unreadable file is counted as `skipped_file` and yields nothing more. warn=False: skipped documents
    are only counted (the embedded corpus's deliberately mis-encoded stdlib test files; pre-flight scans)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "parquet":
            yield from _iter_parquet(path, text_field, start, stats, warn)
        elif fmt == "jsonl":
            yield from _iter_jsonl(path, text_field, start, stats, warn)
        else:
            yield from _iter_text(path, text_unit, start, stats, warn)
    except (OSError, EOFError, ValueError) as e:  # unreadable, truncated gzip, corrupt parquet, ...
        _warn(stats, "skipped_file", "%s: unreadable (%s: %s)", path, type(e).__name__, e, warn=warn)


def _iter_text(path, unit, start, stats, warn=True):
    if unit == "file":
        if start == 0:
            with _open(path) as f:
                yield 0, _decode(f.read(), stats, path, warn)
        return
    with _open(path) as f:
        if unit == "line":
            for j, line in enumerate(f):
                if j >= start:
                    yield j, _decode(line.rstrip(b"\r\n"), stats, f"{path}:{j + 1}", warn)
            return
        j, para = 0, []  # paragraph: blank-line separated blocks
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                if j >= start:
                    yield j, _decode(b"".join(para).rstrip(b"\r\n"), stats, f"{path} paragraph {j}", warn)
                j, para = j + 1, []
        if para and j >= start:
            yield j, _decode(b"".join(para).rstrip(b"\r\n"), stats, f"{path} paragraph {j}", warn)


def _iter_jsonl(path, field, start, stats, warn=True):
    with _open(path) as f:
        for j, line in enumerate(f):
            if j < start:
                continue
            where = f"{path}:{j + 1}"
            if not line.strip():
                if stats is not None:
                    stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
                yield j, None
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError as e:
                _warn(stats, "skipped_utf8", "%s: not UTF-8 (%s)", where, e.reason, warn=warn)
                yield j, None
                continue
            except ValueError as e:
                _warn(stats, "skipped_json", "%s: invalid JSON line (%s)", where, str(e)[:80], warn=warn)
                yield j, None
                continue
            text = rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                _warn(stats, "skipped_field", "%s: no string field %r", where, field, warn=warn)
                yield j, None
                continue
            if not text.strip():
                if stats is not None:
                    stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
                yield j, None
                continue
            yield j, text


def _iter_parquet(path, field, start, stats, warn=True):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        _warn(stats, "skipped_file", "%s: no column %r (columns: %s)", path, field, pf.schema_arrow.names,
              warn=warn)
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
                    yield j, None
                    continue
                yield j, text


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

    def _keep(self, text: str) -> bool:
        """Held-out documents by content hash: train keeps the rest, validation keeps only them."""
        if self.hash_fraction is None:
            return True
        return split_of(text, self.hash_fraction) == self.split

    def _no_docs_error(self) -> ValueError:
        return ValueError(
            f"data source {self.label} gave reader {self.reader} of {self.n_readers} (rank x worker) no "
            f"{self.split} documents in a whole epoch (counters: {dict(self.stats)}); fix: check the path and "
            f"text_field, or use fewer data-parallel ranks x data.num_workers than the corpus has documents")


class FileSource(Source):
    def __init__(self, files: Sequence[str], *, fmt: str, text_field: str, text_unit: str, warn: bool = True,
                 **kw):
        super().__init__(**kw)
        self.fmt, self.text_field, self.text_unit, self.warn = fmt, text_field, text_unit, warn
        if len(files) >= self.n_readers:  # deal whole files
            self.files, self.stride, self.offset = list(files[self.reader::self.n_readers]), 1, 0
        else:  # every reader scans every file, keeps every R-th document
            self.files, self.stride, self.offset = list(files), self.n_readers, self.reader
        self.state = {"epoch": 0, "file_pos": 0, "doc": 0, "piece": 0}
        self._order: Optional[List[int]] = None
        self._it: Optional[Iterator] = None
        self._pieces: List[str] = []
        self._scratch: Dict[str, int] = {}

    def _epoch_order(self) -> List[int]:
        order = list(range(len(self.files)))
        if self.loop:  # training: a new file order every epoch
            random.Random(f"{self.seed}/{self.index}/{self.reader}/{self.state['epoch']}").shuffle(order)
        return order

    def next(self) -> Optional[str]:
        st = self.state
        while True:
            if self._pieces:  # the rest of a long document
                text = self._pieces.pop(0)
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
                                               warn=self.warn)
            nxt = next(self._it, None)
            j = nxt[0] if nxt is not None else -1
            mine = (self._order[st["file_pos"]] + j) % self.stride == self.offset
            if self._scratch:  # skip counters: only the reader that owns the document (or file) counts them
                if (mine if nxt is not None else self.offset == 0):
                    for k, v in self._scratch.items():
                        self.stats[k] = self.stats.get(k, 0) + v
                self._scratch.clear()
            if nxt is None:  # end of file
                st.update(file_pos=st["file_pos"] + 1, doc=0, piece=0)
                self._it = None
                continue
            text = nxt[1]
            st["doc"] = j
            if text is None or not mine or not self._keep(text):
                st["doc"], st["piece"] = j + 1, 0
                continue
            self.epoch_docs += 1
            if len(text) > self.max_doc_chars:
                self._pieces = remaining_pieces(text, self.max_doc_chars, st["piece"], self.stats)
                continue
            st["doc"], st["piece"] = j + 1, 0
            return text

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
                _warn(self.stats, "skipped_field" if not isinstance(text, str) else "skipped_empty",
                      "%s: record without text in field %r", self.label, self.text_field)
                st["hf"] = after
                continue
            if not self._keep(text):
                st["hf"] = after
                continue
            self.epoch_docs += 1
            if len(text) > self.max_doc_chars:
                self._pieces = remaining_pieces(text, self.max_doc_chars, st["piece"], self.stats)
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
