"""Resuming on another number of ranks or workers: every logical reader continues exactly where it stopped.

The reference for reader j of R is its own stream, read without interruption (a loader on R ranks, one
reader each); after a re-layout, a rank's batches take its readers' next batches in turn, one each.
"""

import pytest
import torch

from data import build_dataloader
from data.loader import merge_loader_states
from data.readers import rank_readers, reader_owner, worker_readers
from tests.data.test_resume import assert_same, checkpoint_roundtrip, make_cfg, take

KW = dict(seq_len=24, micro_batch_size=2, seed=5)


def reader_streams(cfg, tok, n_readers, n):
    """Batches 0..n-1 of each reader j alone (rank j of n_readers, no workers)."""
    cfg0 = make_cfg_like(cfg, workers=0)
    return [take(build_dataloader(cfg0, tok, dp_rank=j, dp_world_size=n_readers, n_readers=n_readers, **KW), n)
            for j in range(n_readers)]


def make_cfg_like(cfg, workers, readers=0):
    import dataclasses

    return dataclasses.replace(cfg, num_workers=workers, readers=readers)


def saved_states(cfg, tok, dp, n):
    """Each of `dp` ranks takes n batches; their states as a checkpoint holds them."""
    states = []
    for r in range(dp):
        loader = build_dataloader(cfg, tok, dp_rank=r, dp_world_size=dp, **KW)
        take(loader, n)
        states.append(checkpoint_roundtrip(loader.state_dict()))
    return states


def in_turn(streams, readers, start):
    """The batches a rank holding `readers` (one group) hands out, starting at each reader's batch start[j]."""
    out, pos = [], dict(start)
    while all(pos[j] < len(streams[j]) for j in readers):
        for j in readers:
            out.append(streams[j][pos[j]])
            pos[j] += 1
    return out


def test_reader_ownership():
    assert rank_readers(4, 2, 0) == [0, 1] and rank_readers(4, 2, 1) == [2, 3]
    assert [rank_readers(5, 2, r) for r in range(2)] == [[0, 1, 2], [3, 4]]
    for R in range(1, 9):
        for D in range(1, R + 1):
            blocks = [rank_readers(R, D, r) for r in range(D)]
            assert sum(blocks, []) == list(range(R)) and min(map(len, blocks)) >= 1
            assert all(reader_owner(j, R, D) == r for r, b in enumerate(blocks) for j in b)
    assert worker_readers([4, 5, 6], 2) == [[4, 6], [5]] and worker_readers([4, 5], 0) == [[4, 5]]
    with pytest.raises(ValueError, match="3 readers cannot feed 4"):
        rank_readers(3, 4, 0)


@pytest.mark.parametrize("new_workers", [0, 2])
def test_shrink_two_ranks_to_one(corpus, tok, new_workers):
    """2 ranks (1 worker each, so 2 readers) stop after 7 batches each; 1 rank continues both readers."""
    cfg = make_cfg(corpus, tok, 1, True)
    streams = reader_streams(cfg, tok, 2, 20)
    states = []
    for r in range(2):
        loader = build_dataloader(cfg, tok, dp_rank=r, dp_world_size=2, **KW)
        assert_same(streams[r][:7], take(loader, 7))  # one reader per rank: its own stream
        states.append(checkpoint_roundtrip(loader.state_dict()))
    one = build_dataloader(make_cfg_like(cfg, new_workers), tok, dp_rank=0, dp_world_size=1, **KW)
    one.load_state_dict(merge_loader_states(states))
    assert one.n_readers == 2 and one.worker_readers == worker_readers([0, 1], new_workers)
    got = take(one, 12)
    assert_same(in_turn(streams, [0, 1], {0: 7, 1: 7})[:12], got)
    # the statistics continue too: 7 + 6 batches of 2 rows per reader
    assert one.stats()["sequences"] == 2 * (7 + 6) * 2


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_after_a_move(corpus, tok, workers):
    """After 2 ranks -> 1, the run has 2 readers while a fresh loader of this config would have 1 x workers:
    a later resume on the same layout must still continue batch for batch (reader and worker turn kept)."""
    cfg = make_cfg(corpus, tok, 1, True)
    streams = reader_streams(cfg, tok, 2, 20)
    states = saved_states(cfg, tok, 2, 4)
    cfg1 = make_cfg_like(cfg, workers)
    one = build_dataloader(cfg1, tok, **KW)
    one.load_state_dict(merge_loader_states(states))
    expected = in_turn(streams, [0, 1], {0: 4, 1: 4})
    assert_same(expected[:3], take(one, 3))  # the next batch is reader 1's: not the start of a turn
    again = build_dataloader(cfg1, tok, **KW)
    assert again.n_readers == max(1, workers)
    again.load_state_dict(checkpoint_roundtrip(one.state_dict()))
    assert again.n_readers == 2
    assert_same(expected[3:9], take(again, 6))


@pytest.mark.parametrize("new_workers", [0, 1, 2])
def test_grow_one_rank_to_two(corpus, tok, new_workers):
    """1 rank with data.readers=4 in one process (its batches from readers 0, 1, 2, 3, 0, ...) stops after 6
    batches (readers 0, 1 read 2, readers 2, 3 read 1); 2 ranks take readers 0-1 and 2-3 from there."""
    cfg = make_cfg_like(make_cfg(corpus, tok, 0, True), workers=0, readers=4)
    streams = reader_streams(cfg, tok, 4, 12)
    first = build_dataloader(cfg, tok, dp_rank=0, dp_world_size=1, **KW)
    assert_same(in_turn(streams, [0, 1, 2, 3], {j: 0 for j in range(4)})[:6], take(first, 6))
    merged = merge_loader_states([checkpoint_roundtrip(first.state_dict())])
    start = {0: 2, 1: 2, 2: 1, 3: 1}
    for r, mine in enumerate(([0, 1], [2, 3])):
        loader = build_dataloader(make_cfg_like(cfg, new_workers), tok, dp_rank=r, dp_world_size=2, **KW)
        loader.load_state_dict(merged)
        assert loader.n_readers == 4
        assert_same(in_turn(streams, mine, start)[:8], take(loader, 8))


def test_uneven_readers_and_a_second_move(corpus, tok):
    """R=3 on 2 ranks (readers 0-1 and 2), then on 3 ranks, then back on 1; each reader's stream is unbroken."""
    cfg = make_cfg_like(make_cfg(corpus, tok, 0, False), workers=0, readers=3)
    streams = reader_streams(cfg, tok, 3, 16)
    pos = {0: 0, 1: 0, 2: 0}

    def run(dp, n, states):
        out = []
        for r in range(dp):
            loader = build_dataloader(cfg, tok, dp_rank=r, dp_world_size=dp, **KW)
            if states is not None:
                loader.load_state_dict(merge_loader_states(states))
            mine = rank_readers(3, dp, r)
            assert_same(in_turn(streams, mine, pos)[:n], take(loader, n))
            for k in range(n):
                pos[mine[k % len(mine)]] += 1
            out.append(checkpoint_roundtrip(loader.state_dict()))
        return out

    states = run(2, 4, None)
    assert pos == {0: 2, 1: 2, 2: 4}
    states = run(3, 3, states)
    states = run(1, 6, states)
    assert pos == {0: 7, 1: 7, 2: 9}


def test_workers_changed_on_the_same_ranks(corpus, tok):
    """data.num_workers 2 -> 1 on one rank: its state alone holds both readers (no merge needed)."""
    cfg = make_cfg(corpus, tok, 2, True)
    streams = reader_streams(cfg, tok, 2, 14)
    a = build_dataloader(cfg, tok, **KW)
    assert_same(in_turn(streams, [0, 1], {0: 0, 1: 0})[:5], take(a, 5))  # workers 0, 1, 0, 1, 0
    b = build_dataloader(make_cfg_like(cfg, 1), tok, **KW)
    b.load_state_dict(checkpoint_roundtrip(a.state_dict()))
    assert b.num_workers == 1 and b.worker_readers == [[0, 1]]
    assert_same(in_turn(streams, [0, 1], {0: 3, 1: 2})[:8], take(b, 8))


def test_state_before_reader_groups_still_loads(corpus, tok):
    """A checkpoint written before this change: no n_readers, and each worker's state a bare stream state."""
    cfg = make_cfg(corpus, tok, 0, True)
    ref = take(build_dataloader(cfg, tok, **KW), 9)
    a = build_dataloader(cfg, tok, **KW)
    take(a, 4)
    state = a.state_dict()
    old = {k: v for k, v in state.items() if k != "n_readers"}
    old["workers"] = [g["readers"][0][1] for g in state["workers"]]
    b = build_dataloader(cfg, tok, **KW)
    b.load_state_dict(checkpoint_roundtrip(old))
    assert_same(ref[4:], take(b, 5))
    two = build_dataloader(cfg, tok, dp_rank=0, dp_world_size=2, n_readers=2, **KW)
    with pytest.raises(ValueError, match=r"has 1 readers \(data.readers, or the checkpoint's\) but 2 data-parallel"):
        two.load_state_dict(merge_loader_states([old]))  # its one reader cannot feed two ranks


def test_too_few_readers_and_disagreeing_states(corpus, tok):
    cfg = make_cfg(corpus, tok, 0, False)
    with pytest.raises(ValueError, match=r"has 1 readers .* 2 data-parallel ranks each need one; fix: data.readers"):
        build_dataloader(cfg, tok, dp_rank=0, dp_world_size=2, n_readers=1, **KW)
    a = build_dataloader(cfg, tok, **KW).state_dict()
    b = build_dataloader(cfg, tok, **dict(KW, seed=6)).state_dict()
    with pytest.raises(ValueError, match="disagree on seed: 5 and 6"):
        merge_loader_states([a, b])
    with pytest.raises(ValueError, match="train.seed"):
        build_dataloader(cfg, tok, **dict(KW, seed=6)).load_state_dict(merge_loader_states([a]))


def test_more_workers_than_readers(corpus, tok, caplog):
    cfg = make_cfg_like(make_cfg(corpus, tok, 0, False), workers=3)
    loader = build_dataloader(cfg, tok, dp_rank=1, dp_world_size=2, n_readers=4, **KW)
    assert loader.num_workers == 2 and loader.worker_readers == [[2], [3]]
    assert "2 DataLoader workers instead of data.num_workers=3" in caplog.text
    assert torch.equal(take(loader, 1)[0]["input_ids"],
                       reader_streams(cfg, tok, 4, 1)[2][0]["input_ids"])


def _rank_files(tmp_path, states, world_ranks=None):
    """Rank files as trainer/checkpoint.py writes them: {"rank", "world_size", "data": {"loader": ...}, "rng"}."""
    ranks = world_ranks or list(range(len(states)))
    for r, st in zip(ranks, states):
        torch.save({"rank": r, "world_size": len(ranks), "data": {"stage": 0, "loader": st}, "rng": None},
                   tmp_path / f"rank{r:05d}.pt")
    return tmp_path


def test_trainer_picks_the_saved_states(corpus, tok, tmp_path):
    """trainer/data_resume.py on rank files: the layout from trainer.json or, for checkpoints saved before it
    had one, from the rank files; refusals unless checkpoint.allow_data_change."""
    from jamba.config import ConfigError
    from trainer.data_resume import resume_loader_state

    cfg = make_cfg(corpus, tok, 0, False)
    streams = reader_streams(cfg, tok, 2, 10)
    states = saved_states(cfg, tok, 2, 3)
    ckpt = _rank_files(tmp_path, states)
    layout = {"n_readers": 2, "dp_world_size": 2, "num_workers": 0, "files": [0, 1]}
    for trainer_state in ({"world_size": 2, "data_layout": layout}, {"world_size": 2}):  # the second: legacy
        got = resume_loader_state(ckpt, trainer_state, None, dp_rank=0, dp_size=1, allow_change=False)
        one = build_dataloader(cfg, tok, **KW)
        one.load_state_dict(got)
        assert_same(in_turn(streams, [0, 1], {0: 3, 1: 3})[:4], take(one, 4))
    # the same data-parallel size (e.g. another tensor-parallel degree): the saved rank's own state
    assert resume_loader_state(ckpt, {"world_size": 4, "data_layout": layout}, None, 1, 2, False) == states[1]
    # more data-parallel ranks than readers
    with pytest.raises(ConfigError, match=r"has 2 readers .* 3 data-parallel ranks.*Resume on at most 2"):
        resume_loader_state(ckpt, {"world_size": 2, "data_layout": layout}, None, 0, 3, False)
    assert resume_loader_state(ckpt, {"world_size": 2, "data_layout": layout}, None, 0, 3, True) is None
    # a saved rank without a loader state cannot hand its readers over
    _rank_files(tmp_path, [states[0], None])
    with pytest.raises(ConfigError, match="cannot be moved to other ranks"):
        resume_loader_state(ckpt, {"world_size": 2, "data_layout": layout}, None, 0, 1, False)
