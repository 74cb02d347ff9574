"""Atomic, verified, sharded, resumable checkpoints with torch Distributed Checkpoint (DCP).

Layout of `<run_dir>/checkpoints/`:

    step_000000200/            a complete checkpoint (has the COMPLETE marker)
        .metadata, __*.distcp   DCP shards: {"model": ..., "optim": ...} from get_state_dict (plain, FSDP2
                                and DTensor models alike; reshardable to another layout by DCP)
        rank00000.pt ...        per-rank state: data-loader position, RNG states (torch, cuda, python, numpy)
        trainer.json            step, tokens seen, curriculum stage, skipped steps, world size, data fingerprint,
                                data layout (readers, ranks, and which rank file holds each data-parallel rank's
                                loader: trainer/data_resume.py moves them to another number of ranks)
        MANIFEST.json           every file's size and CRC32 (trainer/checkpoint_integrity.py)
        COMPLETE                written last (holds the manifest's CRC), before the rename
    .tmp-step_000000300/       a save in progress (or one that crashed): removed at the next start
    invalid-step_000000400/    a checkpoint that failed verification at a resume, moved aside for inspection

A save writes everything into `.tmp-<name>`; once every rank's files are written and checksummed, rank 0
writes MANIFEST.json and COMPLETE and renames the directory to `<name>` (atomic on POSIX). A crash at any
point leaves the previous complete checkpoint in use. With `checkpoint.async_save` the state is first
staged to CPU memory (the only stall), then a background thread writes, checksums and completes it; the
next save, the end of the run and a signal exit wait for it. A resume takes the newest checkpoint whose
files all match their CRCs (every rank reaches the same verdict), falling back loudly past corrupt ones.
Never written: a state with non-finite parameters (the trainer also skips saves during a non-finite
streak), or a save that would not fit on the disk. The run directory is locked (trainer/run_lock.py).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from jamba.config import ConfigError
from trainer import checkpoint_integrity as integ
from trainer.build import seed_everything
from trainer.checkpoint_integrity import CheckpointDiskFull
from trainer.config import CheckpointConfig
from trainer.data_fingerprint import describe_change
from trainer.distributed import World, all_reduce_scalars, barrier, broadcast_object, is_dist, new_gloo_group
from trainer.metrics import REPLAYED, finish_interrupted_set_aside
from trainer.run_lock import RunLock

log = logging.getLogger(__name__)
# DCP says so on every single-process save (also from the background writer, where a local filter cannot
# reach): saving in one process is the intent.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")

MARKER = "COMPLETE"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
INVALID_PREFIX = "invalid-"
_NAME = re.compile(r"^step_(\d+)$")  # anything else (step_12.bak, notes) is not a checkpoint
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


def reseed_after_move(seed: int, step: int, rank: int) -> int:
    """Seed Python, NumPy and torch (every device) for a rank resumed on another number of ranks, where no saved
    RNG state is this rank's own. The seed is a hash of (train.seed, step, rank): the streams differ per rank, do
    not replay the first steps' (train.seed + rank), and two resumes at different steps get different ones."""
    digest = hashlib.sha256(f"jamba-rng/{seed}/{step}/{rank}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") % 2**63
    seed_everything(derived)
    return derived


def _all_gather(obj: Any, group=None) -> List[Any]:
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _rank0_for_all(world: World, fn: Callable[[], None]) -> None:
    """Run fn on rank 0; an error there is raised on every rank (no rank is left waiting in a collective)."""
    err: Optional[BaseException] = None
    if world.is_main:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            err = e
    verdict = broadcast_object(None if err is None else (isinstance(err, ConfigError), str(err)))
    if err is not None:
        raise err
    if verdict is not None:
        raise (ConfigError if verdict[0] else RuntimeError)(f"(from rank 0) {verdict[1]}")


def _local_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    ts = [p for p in model.parameters()] + [b for b in model.buffers()]
    for st in optimizer.state.values():
        ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return [t.to_local() if hasattr(t, "to_local") else t for t in ts]


@dataclass
class _Save:
    step: int
    tmp: Path
    final: Path
    rank_blob: bytes
    meta: Dict[str, Any]
    need: int
    started: float
    staged_s: float = 0.0


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, world: World,
                 data_fingerprint: Optional[Dict[str, str]] = None, device_type: str = "cpu"):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.cfg, self.world = cfg, world
        self.data_fingerprint = data_fingerprint
        self.device_type = device_type
        self.async_save = cfg.async_save if cfg.async_save is not None else device_type == "cuda"
        self._lock = RunLock(self.run_dir)
        self._pending: Optional[Future] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stager = None
        self._group = None  # the background writer's own gloo group: never interleaves with training's
        self.last_save: Dict[str, float] = {}
        _rank0_for_all(world, self._prepare_run_dir)
        if self.async_save and is_dist():
            self._group = new_gloo_group()
        barrier()

    # ---- the run directory ---------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        """Rank 0: lock the run directory, refuse to mix two runs, remove saves that died mid-write."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        atexit.register(self._lock.release)
        self.root.mkdir(parents=True, exist_ok=True)
        earlier = [p.name for p in self.folders()]  # complete or not: a fresh run's saves would overwrite both
        metrics = self.run_dir / "metrics.jsonl"
        has_metrics = metrics.is_file() and metrics.stat().st_size > 0
        if (earlier or has_metrics) and self.cfg.overwrite:
            self._move_earlier_run_aside(has_metrics)
        elif (earlier or has_metrics) and not self.cfg.resume:
            what = f"checkpoints up to {earlier[-1]}" if earlier else "a metrics.jsonl"
            raise ConfigError(
                f"checkpoint.resume=false but the run directory {self.run_dir} holds an earlier run ({what}): "
                f"its checkpoints would not be replaced and metrics.jsonl would mix both runs. Use a new run "
                f"directory (hydra.run.dir=... or name=...), or checkpoint.overwrite=true to move the earlier "
                f"run to {self.run_dir}/previous-<time>/ and start afresh, or drop checkpoint.resume=false to resume")
        # We hold the lock: every .tmp- directory is a save of a process that is gone.
        for stale in self.root.glob(TMP_PREFIX + "*"):
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _move_earlier_run_aside(self, has_metrics: bool) -> None:
        dest = self.run_dir / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
        dest.mkdir()
        os.rename(self.root, dest / "checkpoints")
        self.root.mkdir()
        finish_interrupted_set_aside(self.run_dir / "metrics.jsonl")  # a killed resume's records go along too
        for name in ("metrics.jsonl", REPLAYED, "wandb_id"):
            if (self.run_dir / name).exists():
                os.rename(self.run_dir / name, dest / name)
        log.warning("checkpoint.overwrite=true: the earlier run's checkpoints and metrics moved to %s; "
                    "starting afresh", dest)

    def close(self) -> None:
        """Wait for a background save, release the lock. Never raises (it runs in train.py's finally)."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 -- reported, the run is ending anyway
            log.error("the last checkpoint could not be completed: %s", e)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._stager is not None:
            self._stager.release()
            self._stager = None
        if self.world.is_main:
            self._lock.release()

    # ---- discovery ----------------------------------------------------------------------------
    def folders(self) -> List[Path]:
        """Checkpoint folders (step_N), complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def complete(self) -> List[Path]:
        """Checkpoints with a COMPLETE marker (not yet verified), oldest first."""
        return [p for p in self.folders() if (p / MARKER).is_file()]

    def latest(self) -> Optional[Path]:
        ckpts = self.complete()
        return ckpts[-1] if ckpts else None

    def verify(self, path: Path) -> List[str]:
        """Collective: what is wrong with a checkpoint ([] = intact), the same answer on every rank. Rank 0
        checks the structure and sizes; the CRC reads are split over the ranks."""
        found = None
        if self.world.is_main:
            try:
                problems, files, _ = integ.check_structure(path, self.world.world_size)
            except OSError as e:
                problems, files = [f"unreadable ({e})"], {}
            found = (problems, files)
        problems, files = broadcast_object(found)
        if problems or not self.cfg.verify or not files:
            return problems
        names = sorted(files)[self.world.rank::self.world.world_size]
        return [p for part in _all_gather(integ.verify_crcs(path, files, names)) for p in part]

    def find_resumable(self) -> Optional[Path]:
        """Collective: the newest intact checkpoint. Corrupt newer ones are named in the log and moved to
        invalid-<name>/ (then a later save of the same step can be written); none intact is an error."""
        names = broadcast_object([p.name for p in self.complete()] if self.world.is_main else None)
        if not names:
            self._refuse_unmarked()
        skipped: List[Tuple[str, List[str]]] = []
        for name in reversed(names):
            problems = self.verify(self.root / name)
            if problems:
                if self.world.is_main:
                    log.error("checkpoint %s is corrupt, skipping it: %s", name, "; ".join(problems[:5]))
                skipped.append((name, problems))
                continue
            if skipped and self.world.is_main:
                for bad, _ in skipped:
                    os.rename(self.root / bad, self.root / (INVALID_PREFIX + bad))
                log.error("resuming from %s, the newest intact checkpoint; skipped (moved to %s*): %s", name,
                          INVALID_PREFIX, ", ".join(f"{b} ({p[0]})" for b, p in skipped))
            barrier()
            return self.root / name
        if skipped:
            raise RuntimeError(
                f"no intact checkpoint in {self.root}: "
                + "; ".join(f"{b}: {', '.join(p[:3])}" for b, p in skipped)
                + ". Move them away to start afresh (or pass checkpoint.overwrite=true)")
        return None

    def _refuse_unmarked(self) -> None:
        """Collective. Checkpoint folders without a COMPLETE marker and none with one: a run directory copied or
        edited by hand (every save writes the marker before the folder gets its name, and a prune removes it first
        only from checkpoints older than a complete one). Starting afresh would train from scratch and overwrite
        them at the same steps: refused, as corrupt checkpoints are."""
        unmarked = broadcast_object([p.name for p in self.folders()] if self.world.is_main else [])
        if unmarked:
            shown = ", ".join(unmarked[-3:]) + (f" and {len(unmarked) - 3} more" if len(unmarked) > 3 else "")
            raise ConfigError(f"{self.root} holds checkpoints without their {MARKER} marker ({shown}) and none with "
                              f"one: a partial copy of a run directory? Copy the whole folders (the marker is "
                              f"written last), or move them away to start afresh (or pass checkpoint.overwrite=true)")

    # ---- save ---------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the background save (if any) is complete; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: Dict[str, Any], data_state: Any) -> Optional[Path]:
        """Collective: every rank calls it. Returns the final directory (complete once `wait()` returns),
        or None when the state is not saved (non-finite parameters)."""
        t0 = time.perf_counter()
        self.wait()
        if time.perf_counter() - t0 > 0.1:  # checkpoint.every is shorter than a background write
            log.warning("checkpoint step %d: waited %.2f s for the previous checkpoint's background write",
                        step, time.perf_counter() - t0)
        t0 = time.perf_counter()
        name = f"{PREFIX}{step:09d}"
        final, tmp = self.root / name, self.root / (TMP_PREFIX + name)
        need = self._check_state_and_space(step, model, optimizer)
        if need is None:
            return None
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        buf = io.BytesIO()
        torch.save({"rank": self.world.rank, "world_size": self.world.world_size, "data": data_state,
                    "rng": rng_state()}, buf)
        meta = dict(trainer_state, world_size=self.world.world_size, data_fingerprint=self.data_fingerprint)
        job = _Save(step, tmp, final, buf.getvalue(), meta, need, t0)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if not self.async_save:
            try:
                dcp.save(state, checkpoint_id=str(tmp))
            except Exception as e:
                raise self._failed(job, e) from e
            self._finish(job, None)
            return final
        try:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group,
                                    async_stager=self._get_stager(), no_dist=not is_dist())
        except Exception as e:
            raise self._failed(job, e) from e
        job.staged_s = time.perf_counter() - t0  # training resumes now
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._executor.submit(self._finish, job, future)
        return final

    def _get_stager(self):
        if self._stager is None:
            from trainer.checkpoint_staging import ReusedBufferStager

            # Kept across saves: its (pinned) CPU buffers are reused; the previous write has ended by then.
            self._stager = ReusedBufferStager(pin_memory=self.device_type == "cuda")
        return self._stager

    def _check_state_and_space(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                               ) -> Optional[int]:
        """Collective. Bytes the checkpoint needs, None when a parameter is non-finite; raises when the disk
        lacks the space. Estimate: the newest checkpoint's size, at least the state's bytes."""
        tensors = _local_tensors(model, optimizer)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        bad = int(torch.stack([~torch.isfinite(p).all() for p in params]).sum()) if params else 0
        device = tensors[0].device if tensors else torch.device("cpu")
        nbytes, bad = all_reduce_scalars(torch.tensor([nbytes, bad], dtype=torch.float64, device=device),
                                         "sum").tolist()
        if bad:
            newest = self.latest()
            log.error("step %d: %d parameter tensors are non-finite: no checkpoint saved (the newest one stays "
                      "%s)", step, int(bad), newest or "none")
            return None
        verdict = None
        if self.world.is_main:
            newest = self.latest()
            need = max(int(nbytes), integ.dir_bytes(newest) if newest else 0)
            free = integ.free_bytes(self.root)
            ok = free >= need * 1.05 + (16 << 20)
            verdict = (ok, need, free, None if ok else integ.disk_full_message(
                step, self.root, need, free, self.cfg.keep_last, newest, during=False))
        ok, need, free, msg = broadcast_object(verdict)
        if not ok:
            raise CheckpointDiskFull(msg)
        return need

    def _failed(self, job: _Save, e: BaseException) -> BaseException:
        """The error to raise for a failed save (the partial directory removed on rank 0)."""
        if self.world.is_main:
            shutil.rmtree(job.tmp, ignore_errors=True)
        if integ.is_disk_full(e):
            free = integ.free_bytes(self.root)
            return CheckpointDiskFull(integ.disk_full_message(job.step, self.root, job.need, free,
                                                              self.cfg.keep_last, self.latest(), during=True))
        return RuntimeError(f"checkpoint step {job.step} failed: {type(e).__name__}: {e}")

    def _finish(self, job: _Save, future: Optional[Future]) -> None:
        """After DCP's write: the rank file, checksums, then (every rank done) MANIFEST, COMPLETE, rename.
        In the background thread for async saves (collectives on the writer's own group)."""
        group, err = self._group, None
        t_write = time.perf_counter()
        try:
            if future is not None:
                future.result()
            integ.write_file(job.tmp / f"rank{self.world.rank:05d}.pt", job.rank_blob)
            if self.world.is_main:
                integ.write_file(job.tmp / "trainer.json", json.dumps(job.meta, indent=1).encode())
            entries = integ.checksum(job.tmp, integ.files_of_rank(job.tmp, self.world.rank))
        except Exception as e:  # noqa: BLE001 -- every rank learns of it below
            err, entries = e, {}
        results = _all_gather((entries, None if err is None else (integ.is_disk_full(err), repr(err))), group)
        failures = [(r, f) for r, (_, f) in enumerate(results) if f is not None]
        if failures:
            rank, (full, text) = failures[0]
            exc = err or (OSError(28, "No space left on device") if full else RuntimeError(f"rank {rank}: {text}"))
            raise self._failed(job, exc)
        if self.world.is_main:
            manifest = integ.manifest_bytes({k: v for part, _ in results for k, v in part.items()})
            integ.write_file(job.tmp / integ.MANIFEST, manifest)
            integ.write_file(job.tmp / MARKER, integ.complete_marker(manifest))
            integ.fsync_dir(job.tmp)
            if job.final.exists():  # a checkpoint of this step from an abandoned history: replaced
                log.warning("replacing the existing checkpoint %s", job.final)
                shutil.rmtree(job.final)
            os.rename(job.tmp, job.final)
            integ.fsync_dir(self.root)
            self._prune()
        if is_dist():
            dist.barrier(group=group)
        done = time.perf_counter()
        if future is not None:
            self.last_save = {"step": job.step, "staged_s": job.staged_s, "written_s": done - t_write}
            if self.world.is_main:  # one line per checkpoint, not one per rank
                log.info("checkpoint step %d: staged in %.2f s, written in %.2f s in the background (%s)",
                         job.step, job.staged_s, done - t_write, job.final)
        else:
            self.last_save = {"step": job.step, "staged_s": done - job.started, "written_s": 0.0}
            if self.world.is_main:
                log.info("checkpoint step %d: written in %.2f s, training waited (%s)", job.step,
                         done - job.started, job.final)

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
        Returns (trainer_state, this rank's state). Refuses (ConfigError) when the data stream cannot
        continue exactly, unless checkpoint.allow_data_change."""
        path = Path(broadcast_object(str(path)))
        trainer_state = json.loads((path / "trainer.json").read_text())
        self._check_data(path, trainer_state)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        saved = _saved_model_keys(path)
        kept = _missing_expert_biases(path, saved, model_sd)  # keep their init values (zeros), read the rest
        _check_model_keys(path, saved, model_sd, kept)
        state = {"model": {k: v for k, v in model_sd.items() if k not in kept}, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # (a BaseException) every rank gets it: all exit alike
            m = re.search(r"Size mismatch between saved (.+?) and current: (.+?) for (\S+)", str(e))
            if m is None:
                raise
            raise ConfigError(f"checkpoint {path} does not fit this model: {m.group(3)} is {m.group(1)} there and "
                              f"{m.group(2)} here; {DOES_NOT_FIT_FIX}") from None
        state["model"].update({k: model_sd[k] for k in kept})
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rank_state = None
        rank_file = path / f"rank{self.world.rank:05d}.pt"
        if trainer_state.get("world_size") == self.world.world_size:
            rank_state = torch.load(rank_file, weights_only=False)
        log.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state, rank_state

    def _check_data(self, path: Path, trainer_state: Dict[str, Any]) -> None:
        changes = []  # another number of ranks is not one: the loaders' readers move (trainer/data_resume.py)
        saved_fp = trainer_state.get("data_fingerprint")
        if saved_fp is not None and self.data_fingerprint is not None:
            changes += describe_change(saved_fp, self.data_fingerprint)
        if not changes:
            return
        if not self.cfg.allow_data_change:
            raise ConfigError(f"resuming {path} would not continue its data stream: {'; '.join(changes)}. Pass "
                              f"checkpoint.allow_data_change=true to resume anyway, or use another run directory")
        log.warning("resuming %s with changed data (checkpoint.allow_data_change=true): %s", path, "; ".join(changes))


DOES_NOT_FIT_FIX = ("the model settings differ from those it was trained with (the warning above names what "
                    "changed): resume with those, or give this config its own run directory")


def _saved_model_keys(path: Path) -> set:
    """The model's tensor names in a DCP checkpoint (its metadata, without the `model.` prefix)."""
    return {k[len("model."):] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            if k.startswith("model.")}


def _check_model_keys(path: Path, saved: set, model_sd: Dict[str, Any], kept: List[str]) -> None:
    """Refuse a checkpoint whose model tensors (`saved`) are not this model's (another layer count, mixer or
    layer pattern): DCP fails with a traceback on a tensor the checkpoint lacks, and silently ignores the
    tensors it holds beyond the model's (resuming 4 trained layers into 2 dropped the other two). The MoE
    expert biases have their own rule (`_missing_expert_biases`)."""
    ours = set(model_sd)
    missing = sorted(k for k in ours - saved if k not in kept)
    extra = sorted(k for k in saved - ours if not k.endswith("expert_bias"))
    if not missing and not extra:
        return

    def some(keys: List[str]) -> str:
        return f"model.{keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")

    what = "; ".join(([f"this model has {some(missing)}, which the checkpoint lacks"] if missing else [])
                     + ([f"the checkpoint has {some(extra)}, which this model lacks"] if extra else []))
    raise ConfigError(f"checkpoint {path} does not fit this model: {what}; {DOES_NOT_FIT_FIX}")


def _missing_expert_biases(path: Path, saved_keys: set, model_sd: Dict[str, Any]) -> List[str]:
    """`model.moe_router_bias_update_rate` changed between the checkpoint and this run. Turned on: the model's
    MoE `expert_bias` buffers are not in the checkpoint; returned, so they start from their init (zero) while
    everything else resumes. Turned off: the checkpoint's biases have no place in the model and are dropped,
    so the routing changes; said loudly either way."""
    saved = {k for k in saved_keys if k.endswith("expert_bias")}
    ours = {k for k in model_sd if k.endswith("expert_bias")}
    missing, dropped = sorted(ours - saved), sorted(saved - ours)
    if missing:
        log.warning("%s has no MoE expert biases (it trained without model.moe_router_bias_update_rate): %d "
                    "layers' biases start at zero and balance from here", path, len(missing))
    if dropped:
        log.warning("%s holds MoE expert biases of %d layers, but model.moe_router_bias_update_rate=0 here: they "
                    "are dropped, so the layers route by their routers alone, not as they trained; set the rate "
                    "again to keep them", path, len(dropped))
    return missing
