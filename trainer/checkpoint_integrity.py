"""What makes a checkpoint trustworthy: a manifest of CRC32 checksums, its verification, disk-space checks.

At save, each rank checksums the files it wrote (DCP shards `__<rank>_*.distcp`, its `rankNNNNN.pt`; rank 0
also `.metadata` and `trainer.json`) right after writing them, while they are still in the page cache
(zlib.crc32: about 2 GB/s per core); rank 0 writes `MANIFEST.json` {file: [bytes, crc32]} and then
`COMPLETE`, which holds the manifest's own CRC. At load, every listed file must exist with its size and
CRC (the files are split over the ranks, each reads its share once), and nothing else is trusted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

MANIFEST = "MANIFEST.json"
_CHUNK = 16 << 20


def crc32_file(path: Path) -> Tuple[int, int]:
    """(size in bytes, CRC32) of a file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                return size, crc
            crc = zlib.crc32(buf, crc)
            size += len(buf)


def files_of_rank(ckpt_dir: Path, rank: int) -> List[str]:
    """Files a rank writes into a checkpoint directory (DCP's FileSystemWriter names shards __<rank>_<i>)."""
    names = [p.name for p in ckpt_dir.glob(f"__{rank}_*.distcp")] + [f"rank{rank:05d}.pt"]
    if rank == 0:
        names += [".metadata", "trainer.json"]
    return sorted(n for n in names if (ckpt_dir / n).is_file())


def checksum(ckpt_dir: Path, names: Iterable[str]) -> Dict[str, List[int]]:
    return {n: list(crc32_file(ckpt_dir / n)) for n in names}


def manifest_bytes(entries: Dict[str, List[int]]) -> bytes:
    return json.dumps({"format": 1, "files": dict(sorted(entries.items()))}, indent=1).encode()


def complete_marker(manifest: bytes) -> bytes:
    return f"ok manifest-crc32={zlib.crc32(manifest):08x}\n".encode()


def check_structure(ckpt_dir: Path, world_size_hint: Optional[int] = None
                    ) -> Tuple[List[str], Dict[str, List[int]], Optional[dict]]:
    """Cheap checks (no file contents read but the small ones). Returns (problems, files to CRC-check,
    trainer.json). A checkpoint without MANIFEST.json (written before manifests existed) gets its
    structure checked only."""
    problems: List[str] = []
    trainer_state = None
    try:
        trainer_state = json.loads((ckpt_dir / "trainer.json").read_text())
        if not isinstance(trainer_state, dict) or "step" not in trainer_state:
            problems.append("trainer.json has no 'step'")
    except FileNotFoundError:
        problems.append("trainer.json is missing")
    except (OSError, ValueError) as e:
        problems.append(f"trainer.json is unreadable ({type(e).__name__}: {e})")
    man_path = ckpt_dir / MANIFEST
    if not man_path.is_file():
        if not (ckpt_dir / ".metadata").is_file():
            problems.append(".metadata is missing")
        ranks = (trainer_state or {}).get("world_size", world_size_hint) or 0
        for r in range(int(ranks)):
            if not (ckpt_dir / f"rank{r:05d}.pt").is_file():
                problems.append(f"rank{r:05d}.pt is missing")
        return problems, {}, trainer_state
    raw = man_path.read_bytes()
    marker = (ckpt_dir / "COMPLETE").read_bytes()
    if marker.startswith(b"ok manifest-crc32=") and marker != complete_marker(raw):
        problems.append(f"{MANIFEST} does not match the CRC recorded in COMPLETE")
        return problems, {}, trainer_state
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{MANIFEST} is unreadable ({type(e).__name__})")
        return problems, {}, trainer_state
    for name, (size, _) in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != size:
            problems.append(f"{name} has {p.stat().st_size} bytes, {size} were written")
    return problems, files, trainer_state


def verify_crcs(ckpt_dir: Path, files: Dict[str, List[int]], names: Iterable[str]) -> List[str]:
    problems = []
    for name in names:
        size, crc = files[name]
        try:
            got = crc32_file(ckpt_dir / name)
        except OSError as e:
            problems.append(f"{name} is unreadable ({e})")
            continue
        if got != (size, crc):
            problems.append(f"{name} has CRC32 {got[1]:08x}, {crc:08x} was written")
    return problems


# ---- disk space ---------------------------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (DCP wraps each rank's failure in CheckpointException;
    torch.save reports a short write as 'unexpected pos')."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
    return False


class CheckpointDiskFull(RuntimeError):
    """Not enough disk space for a checkpoint (checked before the save, or the save hit ENOSPC)."""


def disk_full_message(step: int, where: Path, need: int, free: int, keep_last: int, newest: Optional[Path],
                      during: bool) -> str:
    what = "ran out of disk space while writing" if during else "not enough disk space for"
    return (f"{what} checkpoint step {step} in {where}: a checkpoint needs about {gib(need)}, {gib(free)} are "
            f"free; with checkpoint.keep_last={keep_last} the run needs {keep_last + 1} of them at once "
            f"(about {gib(need * (keep_last + 1))}). "
            + ("The partial save was removed; " if during else "Nothing was written; ")
            + (f"the older checkpoints are intact (newest: {newest.name}). " if newest else "")
            + "Free disk space or lower checkpoint.keep_last, then re-run the same command to resume.")


def fsync_dir(path: Path) -> None:
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


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
