"""GPU: the training step's host synchronisations (run with -m gpu on a CUDA machine).

A non-logging step must synchronise the host with the device exactly once (the packed losses and flags,
read to decide whether to step and whether to stop): no per-micro-batch `.item()` / `.cpu()` of losses
or expert counts, no separate read of the gradient norm, no blocking host-to-device batch copies.
`torch.cuda.set_sync_debug_mode("warn")` reports every synchronising CUDA call."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainer.profile import host_syncs
from trainer_standins import StandInLM, StandInLoader, small_run_config

pytestmark = pytest.mark.gpu


class SyncFreeLM(StandInLM):
    """The stand-in without its own syncs (bincount on CUDA reads the maximum on the host)."""

    def forward(self, input_ids, labels=None, doc_ids=None, targets=None):
        h = self.embed(input_ids)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        probs = self.router(h).softmax(-1)  # (B, L, 4)
        counts = F.one_hot(probs.argmax(-1), 4).sum((0, 1))[None]  # (1, 4) on the device
        aux = 4 * (probs.mean((0, 1)) ** 2).sum()
        lm = F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())
        return SimpleNamespace(loss=lm + 0.01 * aux, lm_loss=lm, aux_loss=aux, z_loss=None, expert_counts=counts)


def test_one_host_sync_per_training_step(tmp_path):
    from trainer.checkpoint import CheckpointManager
    from trainer.curriculum import Curriculum
    from trainer.distributed import World
    from trainer.loop import Trainer
    from trainer.optim import build_optimizer

    device = torch.device("cuda")
    cfg = small_run_config(max_steps=4)
    cfg.train.global_batch_tokens = 4 * 32  # 4 micro-batches of 4 x 8
    model = SyncFreeLM().to(device)
    opt = build_optimizer(model, cfg.optim, "cuda")
    curriculum = Curriculum(cfg.curriculum, cfg.train.global_batch_tokens, cfg.train.max_steps, 1)
    trainer = Trainer(cfg, model, opt, curriculum, lambda stage, state: StandInLoader(stage.seq_len,
                      stage.micro_batch_size), None, CheckpointManager(tmp_path, cfg.checkpoint, World()), None,
                      World(), device, 1)
    stage = curriculum.stage_at(0)
    trainer._open_loader(stage, None)
    trainer.train_step(stage)  # first step: optimizer state, allocator warm-up
    trainer.state.step += 1
    torch.cuda.synchronize()
    with host_syncs() as syncs:  # "file:line" of each
        out = trainer.train_step(stage)
    assert len(syncs) == 1, syncs
    assert out["finite"] and out["expert_counts"].device.type == "cuda"


def test_nccl_stopped_rank_becomes_an_error(tmp_path):
    """2 GPUs, NCCL, train.py on the tiny model, the ranks started as separate nodes: rank 1 SIGSTOPped
    after step 3. NCCL collectives are asynchronous, so rank 0 blocks where the host next waits; its
    watchdog thread warns at T/2 naming that phase and the silent rank, and NCCL's watchdog (or the
    trainer's) ends it soon after T = train.collective_timeout_s."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout_s = 20
    procs = []
    for rank in range(2):
        env = {**os.environ, "WANDB_MODE": "disabled", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "train.py", "experiment=debug", "train.device=cuda", "parallel=fsdp",
               "train.max_steps=100000", "train.eval_every=0", "checkpoint.every=0", "train.compile=false",
               f"train.collective_timeout_s={timeout_s}", f"hydra.run.dir={tmp_path / 'run'}"]
        procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=open(tmp_path / f"log{rank}.txt", "w"),
                                      stderr=subprocess.STDOUT))
    survivor, victim = procs
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert survivor.poll() is None and victim.poll() is None, (tmp_path / "log0.txt").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        os.kill(victim.pid, signal.SIGSTOP)
        t0 = time.time()
        survivor.wait(timeout=2 * timeout_s + 60)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = (tmp_path / "log0.txt").read_text()
    assert survivor.returncode != 0 and waited < 2 * timeout_s + 30, (waited, log[-4000:])
    assert "rank 0 of 2:" in log and "rank 1 (host" in log, log[-4000:]  # the warning or the error
