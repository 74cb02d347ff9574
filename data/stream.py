"""One reader's token stream: source mixture -> tokenise -> shuffle buffer -> pack into fixed-length rows.

A *reader* is one (data-parallel rank, DataLoader worker) pair. Its whole position is `state_dict()`:
every source's position, the mixture and buffer draw counters, the shuffle buffer's documents (as token
bytes), the packing remainder and the counters. Randomness comes from a counter-based hash (seed, reader,
stream, counter), so the RNG state is a pair of integers and restoring it is exact.

Packing: documents become `tokens + [eos]`, concatenated; each row is a window of seq_len + 1 tokens and
the next window starts seq_len tokens later (the last token of a row is the first of the next), so every
token is a target exactly once: input_ids = window[:-1], targets = window[1:] (already aligned: the model
takes them as `targets=`, not HF's `labels=`, which would drop each row's last target). `doc_ids` numbers the
documents inside each row from 0 (for document masking in attention); an eos belongs to the document it ends.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

STATE_VERSION = 1
COUNTERS = ("docs", "tokens", "sequences", "split_docs", "skipped_empty", "skipped_utf8", "skipped_json",
            "skipped_field", "skipped_file")


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
        self.buffer: List[np.ndarray] = []  # tokenised documents waiting (each ends with eos)
        self.pending: List[Tuple[np.ndarray, int]] = []  # packing remainder: (tokens, doc number) chunks
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

    def _read_doc(self) -> Optional[np.ndarray]:
        """The next document of the mixture, tokenised; None when every source is exhausted."""
        while True:
            i = self._pick_source()
            if i is None:
                return None
            text = self.sources[i].next()
            if text is None:
                self.exhausted[i] = True
                continue
            ids = self.tok.encode(text)
            ids.append(self.eos)
            self.stats["docs"] += 1
            return np.asarray(ids, dtype=self.dtype)

    def next_doc(self) -> Optional[np.ndarray]:
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
            t, d = self.pending[k]
            take = min(len(t), n - got)
            toks.append(t[:take])
            docs.append(np.full(take, d, dtype=np.int64))
            got += take
            k += 1
        last_t, last_d = self.pending[k - 1]
        used_in_last = len(toks[-1])
        rest = [(last_t[used_in_last - 1:], last_d)] + self.pending[k:]  # overlap by one token
        self.pending = rest
        self.pending_len -= n - 1
        return np.concatenate(toks), np.concatenate(docs)

    def next_row(self, seq_len: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(tokens [seq_len + 1], doc numbers [seq_len + 1]) or None at the end of a finite stream."""
        while self.pending_len < seq_len + 1:
            doc = self.next_doc()
            if doc is None:
                return None
            self.pending.append((doc, self.doc_counter))
            self.pending_len += len(doc)
            self.doc_counter += 1
            self.stats["tokens"] += len(doc)
        self.stats["sequences"] += 1
        return self._window(seq_len + 1)

    def batches(self, seq_len: int, micro_batch_size: int, doc_ids: bool = True) -> Iterator[Dict[str, torch.Tensor]]:
        """Batches of {"input_ids", "targets"[, "doc_ids"]} [B, L] long, until a finite stream ends."""
        while True:
            rows = []
            for _ in range(micro_batch_size):
                row = self.next_row(seq_len)
                if row is None:
                    return  # the last partial batch of a finite (validation) stream is dropped
                rows.append(row)
            tok = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))  # (B, L + 1)
            batch = {"input_ids": tok[:, :-1].contiguous(), "targets": tok[:, 1:].contiguous()}
            if doc_ids:
                d = np.stack([r[1][:-1] - r[1][0] for r in rows])  # (B, L), 0 = first document of the row
                batch["doc_ids"] = torch.from_numpy(d)
            yield batch

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
            "buffer": [d.tobytes() for d in self.buffer],
            "pending": [(t.tobytes(), int(d)) for t, d in self.pending],
            "doc_counter": self.doc_counter,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
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
        self.buffer = [np.frombuffer(b, dtype=dt).astype(self.dtype) for b in sd["buffer"]]
        self.pending = [(np.frombuffer(b, dtype=dt).astype(self.dtype), int(d)) for b, d in sd["pending"]]
        self.pending_len = sum(len(t) for t, _ in self.pending)
        self.doc_counter = int(sd["doc_counter"])
        self.stats.clear()
        self.stats.update(sd["stats"])
