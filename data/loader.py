"""The per-rank data loader: workers, deterministic batch order, exact resumable state.

    loader = build_dataloader(cfg, tok, seq_len=256, micro_batch_size=8, dp_rank=r, dp_world_size=n, seed=0)
    for batch in loader: ...          # {"input_ids", "targets", "doc_ids"} (B, L) long; infinite for training,
                                      # validation: one pass, its last batch padded (ignored targets, -100)
    state = loader.state_dict()       # after the last batch handed out; save it per rank
    loader = build_dataloader(...); loader.load_state_dict(state)   # continues the identical token stream
    loader.set_shape(seq_len=1024, micro_batch_size=2)              # curriculum: position and remainder kept

Readers (data/readers.py): the stream is cut into R logical readers, R fixed for the whole run (default
dp_world_size x max(1, W), one per worker: rank r with W workers owns readers r*W .. r*W+W-1). PyTorch's
DataLoader hands out batches from its workers round-robin, in order; each batch carries its worker's state
after it (pickled bytes), and the loader keeps the latest per worker plus which worker is next. On resume
the DataLoader's worker j plays logical worker (j + next) % W, so the round-robin continues where it stopped.
A resume on another number of ranks or workers takes the readers' states instead (`merge_loader_states` of
the saved ranks' states, given to `load_state_dict`): every reader continues where it stopped, in another
rank's batches.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import pickle
import sys
import time
import weakref
from typing import Any, Dict, List, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.config import DataConfig
from data.readers import ReaderGroup, default_readers, group_state, rank_readers, sum_stats, worker_readers
from data.sources import expand_path, make_source
from data.stream import COUNTERS, ReaderStream
from data.workers import fork_shielded, init_worker, kill_workers

log = logging.getLogger(__name__)
SPLITS = ("train", "validation")
_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators whose workers run


def _stop_workers(it) -> None:
    """The DataLoader's own shutdown (workers told to exit, joined for up to 5 s, no longer watched by its
    SIGCHLD handler), then SIGKILL for any still running: they ignore the SIGTERM it would send."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    kill_workers(getattr(it, "_workers", ()))
    _LIVE.discard(it)


@atexit.register
def _stop_live_workers() -> None:
    """At interpreter exit, for iterators never closed; before multiprocessing's exit hook (registered earlier,
    so run later), which SIGTERMs daemonic workers and joins them: forever, for workers that ignore SIGTERM."""
    for it in list(_LIVE):
        _stop_workers(it)


def build_stream(cfg: DataConfig, tokenizer, *, reader: int, n_readers: int, seed: int, split: str,
                 state: Optional[Dict[str, Any]] = None) -> ReaderStream:
    """One reader's stream. Training loops over epochs forever; validation is one in-order pass."""
    train = split == "train"
    if train:
        specs = cfg.sources
        frac = cfg.validation_fraction if (not cfg.validation_sources and cfg.validation_fraction > 0) else None
    elif cfg.validation_sources:
        specs, frac = cfg.validation_sources, None
    elif cfg.validation_fraction > 0:
        specs, frac = cfg.sources, cfg.validation_fraction
    else:
        raise ValueError("data.validation_fraction=0 and data.validation_sources=[]: there is no validation "
                         "split; fix: set one of them, or train.eval_every=0")
    stats: Dict[str, int] = {}
    sources = [make_source(s, index=i, reader=reader, n_readers=n_readers, seed=seed, split=split,
                           hash_fraction=frac, max_doc_chars=cfg.max_doc_chars, loop=train, stats=stats)
               for i, s in enumerate(specs)]
    stream = ReaderStream(sources, [s.weight for s in specs], tokenizer, seed=seed, reader=reader,
                          shuffle_buffer=cfg.shuffle_buffer if train else 1, stats=stats)
    if state is not None:
        stream.load_state_dict(state)
    return stream


def build_group(cfg: DataConfig, tokenizer, *, readers: List[int], n_readers: int, seed: int, split: str,
                state: Any = None) -> ReaderGroup:
    """The streams of one worker's readers (state: a group state, pickled or not, or None)."""
    return ReaderGroup(lambda j, st: build_stream(cfg, tokenizer, reader=j, n_readers=n_readers, seed=seed,
                                                  split=split, state=st), readers, _unpickled(state))


class _Workers(IterableDataset):
    """What each DataLoader worker runs: its logical readers' streams, batches tagged with the state after.
    Holds plain parameters, not the loader (no reference cycle keeps finished workers alive)."""

    def __init__(self, cfg, tokenizer, params: Dict[str, Any], states: List[Any], offset: int):
        self.cfg, self.tokenizer, self.p, self.states, self.offset = cfg, tokenizer, params, states, offset

    def __iter__(self):
        p, info = self.p, get_worker_info()
        w = (info.id + self.offset) % p["num_workers"]
        stream = build_group(self.cfg, self.tokenizer, readers=p["worker_readers"][w], n_readers=p["n_readers"],
                             seed=p["seed"], split=p["split"], state=self.states[w])
        for batch in stream.batches(p["seq_len"], p["micro_batch_size"], self.cfg.doc_ids, p["split"] != "train"):
            batch["_worker"] = w
            batch["_state"] = pickle.dumps(stream.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)
            batch["_stats"] = dict(stream.stats)
            yield batch


class PackedLoader:
    """Iterable of packed batches for one data-parallel rank, with state_dict()/load_state_dict()."""

    def __init__(self, cfg: DataConfig, tokenizer, *, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 0, split: str = "train", n_readers: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: allowed {SPLITS}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size})")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.dp_rank, self.dp_world_size, self.seed = int(dp_rank), int(dp_world_size), int(seed)
        self.set_shape(seq_len, micro_batch_size)
        for i, spec in enumerate(cfg.sources if split == "train" else (cfg.validation_sources or cfg.sources)):
            if spec.path and not expand_path(spec.path):  # fail now, not in a worker at the first batch
                raise ValueError(f"data.sources[{i}].path={spec.path!r} matches no file; fix: give an existing "
                                 f"file, directory or glob (e.g. 'corpus/**/*.jsonl')")
        if split == "train":
            self._set_readers(n_readers or cfg.readers or default_readers(dp_world_size, cfg.num_workers))
        else:  # validation: a short in-process pass, one reader per rank, never resumed
            self._set_readers(dp_world_size, num_workers=0)
        self._gen = None  # weakref to the live iterator

    def _set_readers(self, n_readers: int, num_workers: Optional[int] = None) -> None:
        """Lay out n_readers over the ranks and this rank's workers; every position starts afresh."""
        W = self.cfg.num_workers if num_workers is None else num_workers
        if n_readers < self.dp_world_size:
            raise ValueError(f"the training data has {n_readers} readers (data.readers, or the checkpoint's) but "
                             f"{self.dp_world_size} data-parallel ranks each need one; fix: data.readers >= "
                             f"{self.dp_world_size} for a new run")
        self.n_readers = int(n_readers)
        mine = rank_readers(self.n_readers, self.dp_world_size, self.dp_rank)
        if W > len(mine):
            log.warning("data-parallel rank %d reads %d of the %d readers: %d DataLoader workers instead of "
                        "data.num_workers=%d", self.dp_rank, len(mine), self.n_readers, len(mine), W)
            W = len(mine)
        self.num_workers = W
        self.worker_readers = worker_readers(mine, W)  # per logical worker
        n = max(1, W)
        self._states: List[Any] = [None] * n  # latest state per logical worker (dict, bytes or None)
        self._stats: List[Dict[str, int]] = [{} for _ in range(n)]
        self._next = 0  # logical worker of the next batch
        self._live: Optional[ReaderGroup] = None  # num_workers == 0: the readers being iterated

    def set_shape(self, seq_len: int, micro_batch_size: int) -> None:
        """New row length / rows per batch for the next iter(); position and packing remainder carry over."""
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len={seq_len}, micro_batch_size={micro_batch_size}: both must be >= 1")
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)

    def __iter__(self):
        """Continues from the current state. One live iterator per loader: a new one closes the previous."""
        self._close()
        self._sync_live()
        gen = self._iter_inline() if self.num_workers == 0 else self._iter_workers()
        self._gen = weakref.ref(gen)
        return gen

    def _iter_inline(self):
        self._live = build_group(self.cfg, self.tokenizer, readers=self.worker_readers[0], n_readers=self.n_readers,
                                 seed=self.seed, split=self.split, state=self._states[0])
        self._states[0] = None
        yield from self._live.batches(self.seq_len, self.micro_batch_size, self.cfg.doc_ids,
                                      pad_last=self.split != "train")

    def _iter_workers(self):
        W = self.num_workers
        params = dict(num_workers=W, worker_readers=self.worker_readers, n_readers=self.n_readers, seed=self.seed,
                      split=self.split, seq_len=self.seq_len, micro_batch_size=self.micro_batch_size)
        ds = _Workers(self.cfg, self.tokenizer, params, list(self._states), self._next)
        # fork: workers start in milliseconds (spawn/forkserver re-import torch in each), and data/workers.py
        # makes forking after the process group safe (no inherited sockets, signals ignored, die with us).
        dl = DataLoader(ds, batch_size=None, num_workers=W, prefetch_factor=self.cfg.prefetch_factor,
                        persistent_workers=False, pin_memory=False,
                        worker_init_fn=functools.partial(init_worker, parent_pid=os.getpid()),
                        multiprocessing_context="fork" if sys.platform.startswith("linux") else None)
        with fork_shielded():
            it = iter(dl)  # forks the workers
        _LIVE.add(it)
        try:
            for batch in it:
                w = batch.pop("_worker")
                self._states[w] = batch.pop("_state")
                self._stats[w] = batch.pop("_stats")
                self._next = (w + 1) % W
                yield batch
        finally:  # closed or garbage-collected: stop the workers now, not at interpreter exit
            _stop_workers(it)

    def _close(self) -> None:
        prev = self._gen() if self._gen is not None else None
        self._gen = None
        if prev is not None:
            prev.close()  # stops its workers

    def _sync_live(self) -> None:
        if self._live is not None:
            self._states[0] = self._live.state_dict()
            self._stats[0] = dict(self._live.stats)
            self._live = None

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Position after the last batch handed out (prefetched batches are produced again on resume)."""
        if self._live is not None:
            workers = [self._live.state_dict()]
        else:
            workers = [pickle.loads(s) if isinstance(s, bytes) else s for s in self._states]
        return {"dp_rank": self.dp_rank, "dp_world_size": self.dp_world_size, "num_workers": self.num_workers,
                "n_readers": self.n_readers, "seed": self.seed, "split": self.split, "next_worker": self._next,
                "workers": workers}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """A state of this loader's layout (same ranks, workers and readers) continues exactly, batch for batch.
        Otherwise the state must hold every reader of this rank: a `merge_loader_states` of the saved ranks'
        states (or one rank's, when only data.num_workers changed); each reader then continues where it
        stopped, and this rank's batches take them in turn from the first."""
        for key in ("seed", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data loader state has {key}={state[key]!r} but this loader has {key}="
                                 f"{getattr(self, key)!r}; fix: resume with the same train.seed")
        self._close()
        if state.get("kind") != "readers":
            lay = saved_layout(state)
            if lay["n_readers"] != self.n_readers:  # the run's count, not this config's default
                self._set_readers(lay["n_readers"])
            if any(lay[k] != getattr(self, k) for k in lay):
                return self.load_state_dict(merge_loader_states([state]))
            self._live = None
            self._states = [group_state(_unpickled(s), r[0]) for s, r in zip(state["workers"], self.worker_readers)]
            self._stats = [_stats(s) for s in self._states]
            self._next = int(state["next_worker"])
            return None
        if self.cfg.readers and self.cfg.readers != state["n_readers"] and self.split == "train":
            log.warning("data.readers=%d, but the saved stream has %d readers: resuming keeps %d", self.cfg.readers,
                        state["n_readers"], state["n_readers"])
        if state["n_readers"] != self.n_readers:
            self._set_readers(state["n_readers"])
        saved = state["readers"]
        missing = [j for w in self.worker_readers for j in w if j not in saved]
        if missing:
            raise ValueError(f"data loader state lacks readers {_span(missing)} of data-parallel rank {self.dp_rank} "
                             f"of {self.dp_world_size} ({self.n_readers} readers): merge the states of every saved "
                             f"rank that read them (merge_loader_states)")
        self._live = None
        self._states = [{"readers": [[j, saved[j]] for j in w], "next": 0} for w in self.worker_readers]
        self._stats = [_stats(s) for s in self._states]
        self._next = 0
        return None

    def stats(self) -> Dict[str, int]:
        """Counters summed over this rank's readers: docs, tokens, sequences, split_docs, skipped_*."""
        per = [dict(self._live.stats)] if self._live is not None else self._stats
        return {k: sum(int(s.get(k, 0)) for s in per) for k in COUNTERS}


def saved_layout(state: Dict[str, Any]) -> Dict[str, int]:
    """What a saved rank state's exact resume needs equal: dp_rank, dp_world_size, num_workers, n_readers
    (states from before `n_readers` had one reader per worker)."""
    dp, W = state["dp_world_size"], state["num_workers"]
    return {"dp_rank": state["dp_rank"], "dp_world_size": dp, "num_workers": W,
            "n_readers": state.get("n_readers", default_readers(dp, W))}


def _unpickled(state: Any) -> Any:
    return pickle.loads(state) if isinstance(state, bytes) else state


def _stats(group: Optional[Dict[str, Any]]) -> Dict[str, int]:
    return sum_stats((st or {}).get("stats", {}) for _, st in (group or {}).get("readers", []))


def _span(ids: List[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 else str(ids)


def merge_loader_states(states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The readers' positions in saved per-rank loader states, for a loader of another layout:
    {"kind": "readers", "n_readers", "seed", "split", "readers": {reader id: state or None (at its start)}}.
    Ranks of one data-parallel rank (tensor / context parallel) hold equal states: give each once or not."""
    out: Dict[str, Any] = {"kind": "readers", "readers": {}}
    for st in states:
        lay = saved_layout(st)
        for key, val in (("n_readers", lay["n_readers"]), ("seed", st["seed"]), ("split", st["split"])):
            if out.setdefault(key, val) != val:
                raise ValueError(f"data loader states disagree on {key}: {out[key]!r} and {val!r} (states of "
                                 f"different runs?)")
        mine = rank_readers(lay["n_readers"], lay["dp_world_size"], lay["dp_rank"])
        for ids, group in zip(worker_readers(mine, lay["num_workers"]), st["workers"]):
            group = group_state(_unpickled(group), ids[0])
            for j, rs in (group["readers"] if group is not None else [[j, None] for j in ids]):
                out["readers"][int(j)] = rs
    return out


def build_dataloader(cfg: Optional[DataConfig], tokenizer, *, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                     dp_world_size: int = 1, seed: int = 0, split: str = "train",
                     n_readers: Optional[int] = None) -> PackedLoader:
    """The loader for one data-parallel rank (see module docstring). cfg=None: DataConfig() defaults;
    n_readers: the training stream's readers (default data.readers, or dp_world_size x max(1, workers))."""
    cfg = cfg if cfg is not None else DataConfig()
    if not isinstance(cfg, DataConfig):  # an OmegaConf node or a dict
        cfg = DataConfig(**{k: v for k, v in dict(cfg).items()})
    if tokenizer is None:
        from data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(cfg)
    return PackedLoader(cfg, tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                        dp_world_size=dp_world_size, seed=seed, split=split, n_readers=n_readers)


def main(argv=None) -> int:
    """Throughput of the loader on the default corpus (or --path): python -m data.loader --seq-len 2048"""
    p = argparse.ArgumentParser(prog="python -m data.loader", description="measure loader throughput")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--readers", type=int, default=0, help="data.readers (0: one per worker)")
    p.add_argument("--path", default=None, help="a file/glob instead of the embedded corpus")
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_cli_args(args)
        loader, tok = _cli_loader(args)
    except (ValueError, OSError, RuntimeError) as e:  # a user's input: one line, not a traceback; nothing started
        print(f"python -m data.loader: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    _measure(loader, tok, args)
    return 0


def _check_cli_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a value the loader cannot take (its own checks name data.* keys)."""
    for flag, value, least in (("--seq-len", args.seq_len, 1), ("--batch", args.batch, 1),
                               ("--batches", args.batches, 1), ("--workers", args.workers, 0),
                               ("--readers", args.readers, 0)):
        if value < least:
            raise ValueError(f"{flag} {value} must be >= {least}")
    if args.path and not expand_path(args.path):
        raise ValueError(f"--path {args.path!r} matches no file; give an existing file, directory or glob "
                         "(e.g. 'corpus/**/*.jsonl')")
    if args.tokenizer and not os.path.isfile(os.path.expanduser(args.tokenizer)):
        raise ValueError(f"--tokenizer {args.tokenizer!r}: no such file; give a .model file (python -m data.tokenizer "
                         "train ...) or leave --tokenizer out for the default")


def _cli_loader(args: argparse.Namespace):
    """The tokenizer and the loader main() measures (nothing iterated yet: no worker started)."""
    from data.config import SourceConfig
    from data.tokenizer import load_tokenizer

    cfg = DataConfig(num_workers=args.workers, readers=args.readers, tokenizer=args.tokenizer,
                     sources=[SourceConfig(path=args.path)] if args.path else [SourceConfig(builtin="python_stdlib")])
    try:
        tok = load_tokenizer(cfg)
    except RuntimeError as e:  # sentencepiece's own message names neither the flag nor the file
        if not args.tokenizer:
            raise
        raise ValueError(f"--tokenizer {args.tokenizer!r} is not a sentencepiece model ({e})") from None
    return build_dataloader(cfg, tok, seq_len=args.seq_len, micro_batch_size=args.batch), tok


def _measure(loader: PackedLoader, tok, args: argparse.Namespace) -> None:
    it = iter(loader)
    for _ in range(max(1, loader.n_readers)):  # startup (workers, each reader's first buffer fill) not timed
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t0
    n = args.batches * args.batch * args.seq_len
    state = len(pickle.dumps(loader.state_dict(), protocol=pickle.HIGHEST_PROTOCOL))
    print(f"{n / dt:,.0f} tokens/s ({args.batches} batches of {args.batch}x{args.seq_len}, workers={args.workers}, "
          f"readers={loader.n_readers}, vocab={tok.vocab_size}); state {state:,} bytes; stats {loader.stats()}")


if __name__ == "__main__":
    raise SystemExit(main())
