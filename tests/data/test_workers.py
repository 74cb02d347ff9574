"""DataLoader worker processes: they ignore the trainer's signals, do not keep its sockets, and never keep the
interpreter from exiting."""

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from data import DataConfig, SourceConfig, build_dataloader
from tests.data.conftest import make_docs, write_jsonl
from tests.envs import pythonpath

ROOT = Path(__file__).resolve().parents[2]


def sockets(pid):
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:"):
            out.add(link)
    return out


def ignored(pid):
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) if mask >> (s - 1) & 1}


def test_workers_ignore_signals_and_drop_inherited_sockets(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(50, seed=1))
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], tokenizer=tok.path, num_workers=2,
                     validation_fraction=0.0)
    listener = socket.socket()  # stands in for the process group's sockets, open before the workers fork
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        loader = build_dataloader(cfg, tok, seq_len=16, micro_batch_size=2)
        it = iter(loader)
        next(it), next(it)  # one batch from each worker: both have started (run their worker_init_fn)
        workers = [p.pid for p in multiprocessing.active_children()]
        assert len(workers) == 2
        ours = sockets(os.getpid())
        assert ours
        for pid in workers:
            assert not sockets(pid) & ours, "a worker still holds the trainer's sockets"
            assert ignored(pid) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
        os.kill(workers[0], signal.SIGTERM)  # as killpg would: nothing happens, batches keep coming
        for _ in range(20):
            next(it)
        it.close()
        assert not multiprocessing.active_children()
    finally:
        listener.close()


def test_exit_with_live_workers_is_prompt_and_clean():
    """An iterator never closed: the interpreter still exits at once (the workers ignore the SIGTERM that
    multiprocessing's exit hook sends them; the loader stops them first)."""
    code = ("from data import DataConfig, build_dataloader\n"
            "from data.tokenizer import load_tokenizer\n"
            "cfg = DataConfig(num_workers=2)\n"
            "it = iter(build_dataloader(cfg, load_tokenizer(cfg), seq_len=64, micro_batch_size=2))\n"
            "next(it)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=pythonpath()),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
