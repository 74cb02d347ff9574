"""One reader's token stream: source mixture -> tokenise -> shuffle buffer -> pack into fixed-length rows.

A *reader* is one of the run's `data.readers` logical streams (data/readers.py deals them to data-parallel ranks
and DataLoader workers). Its whole position is `state_dict()`:
every source's position, the mixture and buffer draw counters, the shuffle buffer's documents, the packing
remainder and the counters. Randomness comes from a counter-based hash (seed, reader, stream, counter), so
the RNG state is a pair of integers and restoring it is exact.

The state stays small whatever the input (it is pickled with every batch a DataLoader worker sends, and saved
per rank): a buffered or partly packed document is stored as its *address* in its source (file, document,
piece, byte offset) plus its token count and CRC, and read and tokenised again on resume, the CRC proving it
is the same document. Only documents of sources that cannot re-read (hub datasets) are stored as tokens.
(A 60 MB single-line document used to put ~64 MB of tokens into every batch's state.)

Packing: documents become `tokens + [eos]`, concatenated; each row is a window of seq_len + 1 tokens and
the next window starts seq_len tokens later (the last token of a row is the first of the next), so every
token is a target exactly once: input_ids = window[:-1], targets = window[1:] (already aligned: the model
takes them as `targets=`, not HF's `labels=`, which would drop each row's last target). `doc_ids` numbers the
documents inside each row from 0 (for document masking in attention); an eos belongs to the document it ends.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from jamba.loss import IGNORE_INDEX

STATE_VERSION = 2  # 1: documents as token bytes (still loaded)
COUNTERS = ("docs", "tokens", "sequences", "split_docs", "skipped_empty", "skipped_utf8", "skipped_json",
            "skipped_field", "skipped_file")


class Doc:
    """A tokenised document (ending with eos) and where it came from: (source index, address) or None."""

    __slots__ = ("tokens", "where", "crc")

    def __init__(self, tokens: np.ndarray, where: Optional[Tuple[int, tuple]]):
        self.tokens, self.where = tokens, where
        self.crc = zlib.crc32(tokens.tobytes()) if where is not None else 0

    def __len__(self) -> int:
        return len(self.tokens)

    def entry(self) -> tuple:
        """What the state holds: ("at", source, address, n_tokens, crc) or ("tokens", bytes)."""
        if self.where is None:
            return ("tokens", self.tokens.tobytes())
        return ("at", self.where[0], tuple(self.where[1]), len(self.tokens), self.crc)


def uniform(seed: int, reader: int, stream: int, counter: int) -> float:
    """A uniform draw in [0, 1) that depends only on its arguments (counter-based RNG)."""
    h = hashlib.blake2b(struct.pack("<qqqq", seed, reader, stream, counter), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


class ReaderStream:
    """Documents of weighted sources, tokenised, shuffled through a buffer and packed into rows."""

    _MIX, _BUF = 1, 2

    def __init__(self, sources: Sequence[Any], weights: Sequence[float], tokenizer, *, seed: int, reader: int,
                 shuffle_buffer: int, stats: Dict[str, int]):
        self.sources, self.weights, self.tok = list(sources), [float(w) for w in weights], tokenizer
        self.seed, self.reader, self.buffer_size = int(seed), int(reader), max(1, int(shuffle_buffer))
        self.dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
        self.eos = int(tokenizer.eos_id)
        self.stats = stats
        for k in COUNTERS:
            stats.setdefault(k, 0)
        self.exhausted = [False] * len(self.sources)
        self.mix_counter = 0
        self.buf_counter = 0
        self.buffer: List[Doc] = []  # tokenised documents waiting (each ends with eos)
        self.pending: List[Tuple[Doc, int, int]] = []  # packing remainder: (document, first token left, doc number)
        self.pending_len = 0
        self.doc_counter = 0

    # ---- documents ------------------------------------------------------------------------------
    def _pick_source(self) -> Optional[int]:
        live = [i for i, done in enumerate(self.exhausted) if not done]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        total = sum(self.weights[i] for i in live)
        u = uniform(self.seed, self.reader, self._MIX, self.mix_counter) * total
        self.mix_counter += 1
        for i in live:
            u -= self.weights[i]
            if u < 0:
                return i
        return live[-1]

    def _read_doc(self) -> Optional[Doc]:
        """The next document of the mixture, tokenised; None when every source is exhausted."""
        while True:
            i = self._pick_source()
            if i is None:
                return None
            src = self.sources[i]
            text = src.next()
            if text is None:
                self.exhausted[i] = True
                continue
            self.stats["docs"] += 1
            where = getattr(src, "last_address", None)
            return Doc(self._tokenize(text), (i, where) if where is not None else None)

    def _tokenize(self, text: str) -> np.ndarray:
        ids = self.tok.encode(text)
        ids.append(self.eos)
        return np.asarray(ids, dtype=self.dtype)

    def next_doc(self) -> Optional[Doc]:
        while len(self.buffer) < self.buffer_size:
            doc = self._read_doc()
            if doc is None:
                break
            self.buffer.append(doc)
        if not self.buffer:
            return None
        i = 0
        if len(self.buffer) > 1:
            i = int(uniform(self.seed, self.reader, self._BUF, self.buf_counter) * len(self.buffer))
            self.buf_counter += 1
        doc = self.buffer[i]
        self.buffer[i] = self.buffer[-1]
        self.buffer.pop()
        return doc

    # ---- packing --------------------------------------------------------------------------------
    def _window(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """The first n pending tokens and their doc numbers; keeps the last of them pending."""
        toks, docs, got, k = [], [], 0, 0
        while got < n:
            doc, start, d = self.pending[k]
            take = min(len(doc) - start, n - got)
            toks.append(doc.tokens[start:start + take])
            docs.append(np.full(take, d, dtype=np.int64))
            got += take
            k += 1
        last, start, d = self.pending[k - 1]
        self.pending = [(last, start + len(toks[-1]) - 1, d)] + self.pending[k:]  # overlap by one token
        self.pending_len -= n - 1
        return np.concatenate(toks), np.concatenate(docs)

    def next_row(self, seq_len: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(tokens [seq_len + 1], doc numbers [seq_len + 1]) or None at the end of a finite stream."""
        while self.pending_len < seq_len + 1:
            doc = self.next_doc()
            if doc is None:
                return None
            self.pending.append((doc, 0, self.doc_counter))
            self.pending_len += len(doc)
            self.doc_counter += 1
            self.stats["tokens"] += len(doc)
        self.stats["sequences"] += 1
        return self._window(seq_len + 1)

    def batches(self, seq_len: int, micro_batch_size: int, doc_ids: bool = True,
                pad_last: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches of {"input_ids", "targets"[, "doc_ids"]} [B, L] long, until a finite stream ends.

        The last rows of a finite stream that do not fill a batch are dropped, or with pad_last (validation)
        come as one last batch of the same shape, filled with copies of its rows whose every target is ignored
        (-100): a validation split smaller than one micro-batch still gives a loss, the shapes stay static, and
        the filler routes through the MoE layers like real text (a constant token would send every filler
        token to the same experts, and under expert parallelism to one rank). A last row shorter than
        seq_len + 1 tokens is still dropped."""
        while True:
            rows = []
            for _ in range(micro_batch_size):
                row = self.next_row(seq_len)
                if row is None:
                    break
                rows.append(row)
            if not rows or (len(rows) < micro_batch_size and not pad_last):
                return
            tok = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))  # (b, L + 1), b <= B
            batch = {"input_ids": tok[:, :-1], "targets": tok[:, 1:]}
            if doc_ids:
                d = np.stack([r[1][:-1] - r[1][0] for r in rows])  # (b, L), 0 = first document of the row
                batch["doc_ids"] = torch.from_numpy(d)
            missing = micro_batch_size - len(rows)
            if missing:  # (B, L): rows 0, 1, ... again, their targets ignored
                again = torch.arange(missing) % len(rows)
                batch = {k: torch.cat([v, v.new_full((missing, seq_len), IGNORE_INDEX) if k == "targets" else v[again]])
                         for k, v in batch.items()}
            yield {k: v.contiguous() for k, v in batch.items()}
            if missing:
                return

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain python objects (ints, strings, bytes, dicts, lists): picklable and small."""
        return {
            "version": STATE_VERSION,
            "reader": self.reader,
            "dtype": np.dtype(self.dtype).str,
            "sources": [s.state_dict() for s in self.sources],
            "exhausted": list(self.exhausted),
            "mix_counter": self.mix_counter,
            "buf_counter": self.buf_counter,
            "buffer": [d.entry() for d in self.buffer],
            "pending": [(doc.entry(), int(start), int(d)) for doc, start, d in self.pending],
            "doc_counter": self.doc_counter,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"data loader state version {sd.get('version')!r} != {STATE_VERSION}; this "
                             f"checkpoint was written by another version of data/: resume with that version")
        if len(sd["sources"]) != len(self.sources):
            raise ValueError(f"data loader state has {len(sd['sources'])} sources but data.sources has "
                             f"{len(self.sources)}; fix: resume with the same data.sources list")
        dt = np.dtype(sd["dtype"])
        for s, ss in zip(self.sources, sd["sources"]):
            s.load_state_dict(ss)
        self.exhausted = list(sd["exhausted"])
        self.mix_counter, self.buf_counter = int(sd["mix_counter"]), int(sd["buf_counter"])
        if sd["version"] == 1:  # token bytes, pending chunks already cut
            self.buffer = [Doc(np.frombuffer(b, dtype=dt).astype(self.dtype), None) for b in sd["buffer"]]
            self.pending = [(Doc(np.frombuffer(b, dtype=dt).astype(self.dtype), None), 0, int(d))
                            for b, d in sd["pending"]]
        else:
            docs = self._docs([e for e in sd["buffer"]] + [e for e, _, _ in sd["pending"]], dt)
            self.buffer = docs[:len(sd["buffer"])]
            self.pending = [(doc, int(start), int(d)) for doc, (_, start, d) in zip(docs[len(sd["buffer"]):],
                                                                                     sd["pending"])]
        self.pending_len = sum(len(doc) - start for doc, start, _ in self.pending)
        self.doc_counter = int(sd["doc_counter"])
        self.stats.clear()
        self.stats.update(sd["stats"])

    def _docs(self, entries: List[tuple], dt: np.dtype) -> List[Doc]:
        """Documents from state entries: token bytes as they are; addresses read again from their sources
        (grouped per source, so the pieces of one long document are read once) and checked by CRC."""
        out: List[Optional[Doc]] = [None] * len(entries)
        wanted: Dict[int, List[int]] = {}
        for k, e in enumerate(entries):
            if e[0] == "tokens":
                out[k] = Doc(np.frombuffer(e[1], dtype=dt).astype(self.dtype), None)
            else:
                wanted.setdefault(int(e[1]), []).append(k)
        for i, ks in wanted.items():
            texts = self.sources[i].read_many([entries[k][2] for k in ks])
            for k, text in zip(ks, texts):
                _, _, address, n, crc = entries[k]
                doc = Doc(self._tokenize(text), (i, tuple(address)))
                if len(doc) != n or doc.crc != crc:
                    raise ValueError(
                        f"data loader state: document {tuple(address)} of source {self.sources[i].label} reads back "
                        f"as {len(doc)} tokens (crc {doc.crc:08x}), the checkpoint has {n} (crc {crc:08x}): the "
                        f"file or the tokenizer changed since the checkpoint, so the data stream cannot continue "
                        f"exactly. Fix: restore them, or start the data loaders afresh (a new run directory)")
                out[k] = doc
        return out
