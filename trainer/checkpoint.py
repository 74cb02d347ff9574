"""Atomic, sharded, resumable checkpoints with torch Distributed Checkpoint (DCP).

Layout of `<run_dir>/checkpoints/`:

    step_000000200/            a complete checkpoint (has the COMPLETE marker)
        .metadata, __*.distcp   DCP shards: {"model": ..., "optim": ...} from get_state_dict (plain, FSDP2
                                and DTensor models alike; reshardable to another layout by DCP)
        rank00000.pt ...        per-rank state: data-loader position, RNG states (torch, cuda, python, numpy)
        trainer.json            step, tokens seen, curriculum stage, skipped steps, world size, LR schedule step
        COMPLETE                written last, before the rename
    .tmp-step_000000300/       a save in progress (or one that crashed): ignored, removed at the next start

A save writes everything into `.tmp-<name>`, waits for all ranks, then rank 0 writes `COMPLETE` and renames
the directory to `<name>` (a rename is atomic on POSIX file systems). A crash at any point leaves the
previous complete checkpoint untouched. After a successful save the oldest ones beyond `keep_last` go.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.config import CheckpointConfig
from trainer.distributed import World, barrier, broadcast_object

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
EXIT_PREEMPTED = 75
"""Exit code after a signal-triggered checkpoint (EX_TEMPFAIL): the job should be requeued; re-running the
same command resumes from the checkpoint just written. launch/slurm/train.sbatch requeues on it."""


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, world: World):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.world = world
        if world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(TMP_PREFIX + "*"):  # a save that crashed earlier
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # ---- discovery ----------------------------------------------------------------------------
    def complete(self) -> List[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Optional[Path]:
        ckpts = self.complete()
        return ckpts[-1] if ckpts else None

    # ---- save ---------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: Dict[str, Any], data_state: Any) -> Path:
        """Collective: every rank calls it. Returns the final directory."""
        name = f"{PREFIX}{step:09d}"
        final, tmp = self.root / name, self.root / (TMP_PREFIX + name)
        if final.joinpath(MARKER).is_file():
            return final
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        rank_state = {"rank": self.world.rank, "world_size": self.world.world_size,
                      "data": data_state, "rng": rng_state()}
        rank_file = tmp / f"rank{self.world.rank:05d}.pt"
        torch.save(rank_state, rank_file)
        with open(rank_file, "rb+") as f:
            os.fsync(f.fileno())
        barrier()
        if self.world.is_main:
            meta = dict(trainer_state, world_size=self.world.world_size)
            _write_file(tmp / "trainer.json", json.dumps(meta, indent=1).encode())
            _write_file(tmp / MARKER, b"ok\n")
            _fsync_dir(tmp)
            if final.exists():  # an incomplete directory of the same name (should not happen)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self) -> None:
        ckpts = self.complete()
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_last)]:
            # Drop the marker first: a crash mid-delete leaves an incomplete (ignored) directory.
            (old / MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """Collective. Loads model and optimizer in place (resharding to the current layout as needed).
        Returns (trainer_state, this rank's state or None when the data-parallel layout changed)."""
        path = broadcast_object(str(path))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer_state = json.loads((Path(path) / "trainer.json").read_text())
        rank_state = None
        rank_file = Path(path) / f"rank{self.world.rank:05d}.pt"
        if trainer_state.get("world_size") == self.world.world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, weights_only=False)
        else:
            log.warning("checkpoint %s was written by %s ranks, this run has %d: model and optimizer are "
                        "resharded, but per-rank data-loader positions and RNG states cannot be mapped; "
                        "the loaders start afresh", path, trainer_state.get("world_size"),
                        self.world.world_size)
        log.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state, rank_state
