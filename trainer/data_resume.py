"""Which data-loader state a rank resumes from, also when the number of ranks changed.

Each checkpoint holds one loader state per rank (rankNNNNN.pt) and, in trainer.json, the data layout:
{"n_readers": R, "dp_world_size": D, "num_workers": W, "files": [the rank file of each data-parallel rank]}.
With the same data-parallel size a rank takes its own file's state (data/loader.py continues it batch for
batch, or re-deals its readers when only data.num_workers changed). With another size, rank r of D' reads the
files of the saved ranks that read its readers (data/readers.py: reader j belongs to rank j * D // R) and
merges their readers' positions: every reader continues where it stopped, none is read twice or skipped.
That needs R >= D' (every rank needs a reader); the run's R is fixed when it starts (`data.readers`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from jamba.config import ConfigError
from trainer.distributed import all_reduce_scalars

log = logging.getLogger(__name__)


def data_layout(loader: Any, rank: int, device: torch.device) -> Optional[Dict[str, Any]]:
    """Collective (every rank, the same steps): the layout recorded in trainer.json, or None for a loader
    without readers (a stand-in)."""
    n_readers = getattr(loader, "n_readers", None)
    if n_readers is None:
        return None
    dp, dp_rank = loader.dp_world_size, loader.dp_rank
    first = torch.full((dp,), -1.0e18, dtype=torch.float64, device=device)
    first[dp_rank] = -float(rank)
    first = -all_reduce_scalars(first, "max")  # the lowest global rank of each data-parallel rank
    return {"n_readers": int(n_readers), "dp_world_size": int(dp), "num_workers": int(loader.num_workers),
            "files": [int(r) for r in first.tolist()]}


def _loader_of(rank_file: Path) -> Optional[Dict[str, Any]]:
    data = torch.load(rank_file, weights_only=False).get("data")
    return data.get("loader") if data else None


def _ours(state: Dict[str, Any]) -> bool:
    """A data/loader.py state (other loaders, e.g. tests' stand-ins, have their own)."""
    return "dp_world_size" in state and "workers" in state


def resume_loader_state(path: Path, trainer_state: Dict[str, Any], rank_state: Optional[Dict[str, Any]],
                        dp_rank: int, dp_size: int, allow_change: bool) -> Optional[Dict[str, Any]]:
    """The state to give this rank's loader (`load_state_dict`), or None to start the loaders afresh
    (a checkpoint without loader state, or checkpoint.allow_data_change when the stream cannot continue)."""
    from data.loader import merge_loader_states
    from data.readers import rank_readers, reader_owner

    own = ((rank_state or {}).get("data") or {}).get("loader")
    if rank_state is not None and (own is None or not _ours(own) or (own["dp_world_size"], own["dp_rank"]) ==
                                   (dp_size, dp_rank)):
        return own  # the same ranks (or a loader without readers: its state as it is)
    layout = trainer_state.get("data_layout") or _layout_from_files(path)  # older checkpoints: the rank files say
    if layout is None:
        return _cannot_move(path, trainer_state, allow_change)
    R, D = layout["n_readers"], layout["dp_world_size"]
    if D == dp_size:  # another tensor / context / expert layout over the same data-parallel ranks: exact
        return _loader_of(path / f"rank{layout['files'][dp_rank]:05d}.pt")
    if R < dp_size:
        msg = (f"{path}'s training data has {R} readers (data.readers, fixed when the run started) but this run has "
               f"{dp_size} data-parallel ranks, and each needs one")
        if not allow_change:
            raise ConfigError(f"{msg}. Resume on at most {R} data-parallel ranks, or pass "
                              f"checkpoint.allow_data_change=true to start the data loaders afresh (documents already "
                              f"trained on come again); start runs that may grow with data.readers >= their largest "
                              f"data-parallel size")
        log.warning("%s; the data loaders start afresh (checkpoint.allow_data_change=true)", msg)
        return None
    owners = sorted({reader_owner(j, R, D) for j in rank_readers(R, dp_size, dp_rank)})
    states: List[Dict[str, Any]] = []
    for d in owners:
        st = _loader_of(path / f"rank{layout['files'][d]:05d}.pt")
        if st is None or not _ours(st):  # (every rank sees the same files, so all decide alike)
            return _cannot_move(path, trainer_state, allow_change)
        states.append(st)
    if dp_rank == 0:
        log.info("data: %d readers saved by %d data-parallel ranks continue on %d (rank 0 takes readers from saved "
                 "ranks %s)", R, D, dp_size, owners)
    return merge_loader_states(states)


def _cannot_move(path: Path, trainer_state: Dict[str, Any], allow_change: bool) -> None:
    change = (f"ranks: {trainer_state.get('world_size')} -> this run's (its data-loader states cannot be moved to "
              f"other ranks; the loaders would start over)")
    if not allow_change:
        raise ConfigError(f"resuming {path} would not continue its data stream: {change}. Pass "
                          f"checkpoint.allow_data_change=true to resume anyway, or use another run directory")
    log.warning("resuming %s with changed data (checkpoint.allow_data_change=true): %s", path, change)
    return None


def _layout_from_files(path: Path) -> Optional[Dict[str, Any]]:
    """Layout of a checkpoint without `data_layout` in trainer.json (saved before it had one), from its rank
    files, read until every data-parallel rank has one."""
    from data.loader import saved_layout

    files: Dict[int, int] = {}
    layout = None
    for f in sorted(path.glob("rank*.pt")):
        st = _loader_of(f)
        if st is None or not _ours(st):
            return None
        layout = saved_layout(st)
        files.setdefault(layout.pop("dp_rank"), int(f.stem[len("rank"):]))
        if len(files) == layout["dp_world_size"]:
            break
    if layout is None or len(files) < layout["dp_world_size"]:
        return None
    layout["files"] = [files[d] for d in range(layout["dp_world_size"])]
    return layout
