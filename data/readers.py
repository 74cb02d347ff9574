"""Logical readers: how the training stream is cut into independent streams, and who reads which.

A *reader* is one independent stream of the corpus (data/stream.py `ReaderStream`): reader j of R gets its
own share of the files or documents and its own shuffling, and its position is its state. A run's R is fixed
when it starts (`data.readers`, default data-parallel size x max(1, data.num_workers), one reader per
worker) and kept by every resume, whatever the number of ranks: that is what lets a run resume on another
number of ranks and continue every reader where it stopped, with no document read twice or skipped.

Ownership, for D data-parallel ranks with W workers each:

    rank of reader j        j * D // R                 (a contiguous block; blocks differ by at most one)
    worker of a rank's k-th reader of its block     k % W  (W = 0: the training process)

With R = D x W (the default) rank r owns readers r*W .. r*W + W - 1 and worker w reader r*W + w. A worker
holding several readers hands out their batches in turn (`ReaderGroup`), one batch each.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch


def default_readers(dp_world_size: int, num_workers: int) -> int:
    """R when data.readers=0 (and in loader states saved before R was recorded): one reader per worker."""
    return dp_world_size * max(1, num_workers)


def sum_stats(stats: Iterable[Dict[str, int]]) -> Dict[str, int]:
    """Counters (docs, tokens, ...) summed over readers."""
    out: Dict[str, int] = {}
    for st in stats:
        for k, v in st.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def rank_readers(n_readers: int, dp_world_size: int, dp_rank: int) -> List[int]:
    """The readers of data-parallel rank dp_rank: the j with j * D // R == dp_rank (contiguous)."""
    if n_readers < dp_world_size:
        raise ValueError(f"{n_readers} readers cannot feed {dp_world_size} data-parallel ranks (each needs one)")
    lo = -(-dp_rank * n_readers // dp_world_size)  # ceil(r R / D): the first j with j D // R >= r
    hi = -(-(dp_rank + 1) * n_readers // dp_world_size)
    return list(range(lo, hi))


def reader_owner(reader: int, n_readers: int, dp_world_size: int) -> int:
    """The data-parallel rank that reads `reader` when there are dp_world_size ranks."""
    return reader * dp_world_size // n_readers


def worker_readers(readers: Sequence[int], num_workers: int) -> List[List[int]]:
    """A rank's readers dealt to its max(1, num_workers) workers: worker w gets readers[w::W]."""
    W = max(1, num_workers)
    return [list(readers[w::W]) for w in range(W)]


class ReaderGroup:
    """The readers one worker (or the training process) holds; their batches in turn, one each.

    state: {"readers": [[reader id, ReaderStream state or None (from the start)], ...], "next": index of
    the reader whose batch comes next}."""

    def __init__(self, build: Callable[[int, Optional[dict]], Any], readers: Sequence[int],
                 state: Optional[Dict[str, Any]] = None):
        saved = {int(j): st for j, st in state["readers"]} if state else {}
        if state and sorted(saved) != sorted(readers):
            raise ValueError(f"data loader state holds readers {sorted(saved)}, this worker reads {sorted(readers)}")
        self.ids = [int(j) for j in readers]
        self.streams = [build(j, saved.get(j)) for j in self.ids]
        self.next = int(state["next"]) % len(self.ids) if state else 0

    @property
    def stats(self) -> Dict[str, int]:
        return sum_stats(s.stats for s in self.streams)

    def batches(self, seq_len: int, micro_batch_size: int, doc_ids: bool = True,
                pad_last: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
        """Until one reader's (finite) stream ends: a training stream only ends to start its next epoch."""
        gens = [s.batches(seq_len, micro_batch_size, doc_ids, pad_last) for s in self.streams]
        while True:
            batch = next(gens[self.next], None)
            if batch is None:
                return
            self.next = (self.next + 1) % len(gens)
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"readers": [[j, s.state_dict()] for j, s in zip(self.ids, self.streams)], "next": self.next}


def group_state(state: Any, reader: int) -> Optional[Dict[str, Any]]:
    """A worker's saved state as a group state: saves from before reader groups held one ReaderStream state."""
    if state is None or "readers" in state:
        return state
    return {"readers": [[reader, state]], "next": 0}
