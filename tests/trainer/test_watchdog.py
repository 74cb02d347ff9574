"""trainer/watchdog.py in one process: the no-progress bound ends the process, a distributed failure inside
a phase becomes a CollectiveTimeout naming the phase, other errors pass through unchanged."""

import threading
import time

import pytest
import torch.distributed as dist

from trainer.watchdog import EXIT_HUNG, CollectiveTimeout, Watchdog, is_distributed_failure


class _Store:  # the process group's store, as the heartbeats use it
    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]


def test_no_progress_for_twice_the_timeout_ends_the_process():
    exits = []
    w = Watchdog(0, 2, timeout_s=0.5, store=_Store(), exit_fn=exits.append)
    try:
        with w.phase("a stuck data loader", 7):
            t0 = time.time()
            while not exits and time.time() - t0 < 10:
                time.sleep(0.05)
        assert exits == [EXIT_HUNG]
        assert 1.0 <= time.time() - t0 < 4  # 2 x timeout, checked every beat (0.5 s here)
    finally:
        w.close()


def test_distributed_failure_in_a_phase_names_rank_phase_step_and_silent_peer():
    store = _Store()
    peer = Watchdog(1, 2, timeout_s=2, store=store, exit_fn=lambda code: None)
    with peer.phase("forward and backward", 3):
        time.sleep(0.8)  # its heartbeats (beat_s = 0.5 s) say where it is
        peer.close()  # rank 1 "stops" here: no more heartbeats
    w = Watchdog(0, 2, timeout_s=2, store=store, exit_fn=lambda code: None)
    try:
        time.sleep(3.0)  # the last heartbeat is now older than 3 beats + 1 s
        with pytest.raises(CollectiveTimeout) as err:
            with w.phase("all_reduce of the validation loss during evaluate", 30):
                raise dist.DistBackendError("Timed out waiting 2000ms for recv operation to complete")
        msg = str(err.value)
        assert msg.startswith("rank 0 of 2: all_reduce of the validation loss during evaluate at step 30 failed")
        assert "rank 1 (host" in msg and "sent no heartbeat" in msg and "'forward and backward at step 3'" in msg
        with pytest.raises(ValueError, match="not a collective"):  # other errors unchanged
            with w.phase("optimizer step", 31):
                raise ValueError("not a collective")
        assert w.current.name.startswith("shutting down after a failure in all_reduce")
    finally:
        w.close()


def test_failure_classification():
    assert is_distributed_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert is_distributed_failure(dist.DistBackendError("NCCL error"))
    assert not is_distributed_failure(RuntimeError("CUDA out of memory"))
    assert not is_distributed_failure(KeyboardInterrupt())


def test_groups_created_later_get_the_collective_timeout():
    """Device-mesh sub-groups and the checkpoint writer's group are created without a timeout: c10d's
    default must then be train.collective_timeout_s, not its own 10/30 minutes (private globals: this
    catches a torch release that renames them)."""
    import datetime

    from torch.distributed import Backend
    from torch.distributed import distributed_c10d as c10d

    from trainer.distributed import _default_group_timeout

    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    try:
        _default_group_timeout(datetime.timedelta(seconds=7))
        for backend in ("gloo", "nccl") if dist.is_nccl_available() else ("gloo",):
            assert c10d._get_default_timeout(Backend(backend)) == datetime.timedelta(seconds=7), backend
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved
