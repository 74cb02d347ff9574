"""Exact resume: the token stream of an uninterrupted run equals a stopped-and-resumed one."""

import io

import pytest
import torch

from data import DataConfig, SourceConfig, build_dataloader


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def checkpoint_roundtrip(state):
    """What the trainer does with it: torch.save per rank, torch.load on resume."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain python objects: safe to load


def assert_same(ref, got):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"batch {i} differs in {k}"


def make_cfg(corpus, tok, workers, mixture):
    sources = [SourceConfig(path=str(corpus / "*.jsonl"), weight=3.0)]
    if mixture:
        sources.append(SourceConfig(path=str(corpus / "t*.txt"), weight=1.0))
    return DataConfig(sources=sources, tokenizer=tok.path, num_workers=workers, shuffle_buffer=8,
                      validation_fraction=0.1, prefetch_factor=2)


@pytest.mark.parametrize("workers,mixture", [(0, False), (0, True), (2, True)])
def test_resume_equals_uninterrupted(corpus, tok, workers, mixture):
    cfg = make_cfg(corpus, tok, workers, mixture)
    kw = dict(seq_len=32, micro_batch_size=4, dp_rank=0, dp_world_size=1, seed=7)
    n = 50
    ref = take(build_dataloader(cfg, tok, **kw), n)
    full = build_dataloader(cfg, tok, **kw)
    take(full, n)
    epochs = [s["epoch"] for g in full.state_dict()["workers"] for _, w in g["readers"] for s in w["sources"]]
    assert max(epochs) >= 1, f"the run should cross an epoch boundary, epochs {epochs}"
    for stop in (1, 17, 41):
        first = build_dataloader(cfg, tok, **kw)
        a = take(first, stop)
        state = checkpoint_roundtrip(first.state_dict())
        second = build_dataloader(cfg, tok, **kw)
        second.load_state_dict(state)
        b = take(second, n - stop)
        assert_same(ref, a + b)


def test_resume_twice_same_loader(corpus, tok):
    """iter() again on the same loader continues where the last iterator stopped."""
    cfg = make_cfg(corpus, tok, 0, True)
    kw = dict(seq_len=16, micro_batch_size=3, seed=1)
    ref = take(build_dataloader(cfg, tok, **kw), 10)
    loader = build_dataloader(cfg, tok, **kw)
    assert_same(ref, take(loader, 4) + take(loader, 6))


def flat(batches):
    return torch.cat([b["input_ids"].reshape(-1) for b in batches])


def per_worker(batches, workers, first=0):
    """Flattened input_ids per worker: with W workers the k-th batch comes from worker (first + k) % W."""
    W = max(1, workers)
    out = [[] for _ in range(W)]
    for k, b in enumerate(batches):
        out[(first + k) % W].append(b["input_ids"].reshape(-1))
    return [torch.cat(x) if x else torch.zeros(0, dtype=torch.long) for x in out]


@pytest.mark.parametrize("workers", [0, 2])
def test_curriculum_shape_change_keeps_stream(corpus, tok, workers):
    """Changing seq_len / micro-batch mid-run continues each reader's token stream (remainder carried over)."""
    cfg = make_cfg(corpus, tok, workers, True)
    ref = per_worker(take(build_dataloader(cfg, tok, seq_len=16, micro_batch_size=2, seed=3), 40), workers)
    loader = build_dataloader(cfg, tok, seq_len=16, micro_batch_size=2, seed=3)
    a = take(loader, 5)
    state = checkpoint_roundtrip(loader.state_dict())
    loader2 = build_dataloader(cfg, tok, seq_len=40, micro_batch_size=1, seed=3)  # a new stage's loader
    loader2.load_state_dict(state)
    b = take(loader2, 6)
    loader2.set_shape(24, 3)  # or reshape in place
    c = take(loader2, 2)
    for w, (r, g) in enumerate(zip(ref, per_worker(a + b + c, workers))):
        assert len(g) > 0 and len(r) >= len(g)
        assert torch.equal(g, r[: len(g)]), f"worker {w}'s stream differs"
    for batch in b:
        assert batch["input_ids"].shape == (1, 40)


def test_targets_aligned_and_doc_ids(corpus, tok):
    cfg = make_cfg(corpus, tok, 0, False)
    batches = take(build_dataloader(cfg, tok, seq_len=32, micro_batch_size=4, seed=0), 5)
    stream = flat(batches)
    # every token is a target exactly once: rows overlap by one (targets[:, -1] is the next row's first input)
    rows_in = torch.cat([b["input_ids"] for b in batches])
    rows_lab = torch.cat([b["targets"] for b in batches])
    assert torch.equal(rows_in[:, 1:], rows_lab[:, :-1])
    assert torch.equal(rows_lab[:-1, -1], rows_in[1:, 0])
    assert stream.dtype == torch.long
    for b in batches:
        d = b["doc_ids"]
        assert (d[:, 0] == 0).all()
        # a new document starts right after each eos
        eos = b["input_ids"][:, :-1] == tok.eos_id
        assert torch.equal(eos, d[:, 1:] != d[:, :-1])


def test_state_mismatch_is_refused(corpus, tok):
    cfg = make_cfg(corpus, tok, 0, False)
    a = build_dataloader(cfg, tok, seq_len=16, micro_batch_size=2, dp_rank=0, dp_world_size=2, seed=0)
    take(a, 1)
    b = build_dataloader(cfg, tok, seq_len=16, micro_batch_size=2, dp_rank=1, dp_world_size=2, seed=0)
    with pytest.raises(ValueError, match=r"lacks readers \[1\] of data-parallel rank 1 of 2"):
        b.load_state_dict(a.state_dict())
