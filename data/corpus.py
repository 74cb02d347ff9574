"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs this project has them, so the default run and the tests work offline on a fresh
machine. Files are listed sorted (deterministic); one file is one document; a file goes to the validation
split when a hash of its path relative to the stdlib root falls below VALIDATION_FRACTION (stable across
machines with the same Python version).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Tuple

VALIDATION_FRACTION = 0.02
_EXCLUDE = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_of(key: str, fraction: float) -> str:
    """'validation' for a stable `fraction` of keys, else 'train'."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return "validation" if h / 2.0**64 < fraction else "train"


@lru_cache(maxsize=4)
def stdlib_files(split: str = "train", fraction: float = VALIDATION_FRACTION) -> Tuple[str, ...]:
    """Sorted absolute paths of the stdlib's *.py files in `split` ('train' | 'validation' | 'all')."""
    root = Path(stdlib_root())
    files: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE)
        for name in filenames:
            if name.endswith(".py"):
                files.append(os.path.join(dirpath, name))
    files.sort()
    if split == "all":
        return tuple(files)
    return tuple(f for f in files if split_of(os.path.relpath(f, root), fraction) == split)


def stdlib_fingerprint() -> str:
    """Hash of the train files' relative paths and sizes: a changed stdlib never reuses a stale cache."""
    root, h = stdlib_root(), hashlib.blake2b(digest_size=6)
    for f in stdlib_files("train"):
        h.update(f"{os.path.relpath(f, root)}:{os.path.getsize(f)}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def stdlib_documents(split: str = "train") -> Iterator[str]:
    """The documents (file contents) of the embedded corpus, in order; undecodable files are skipped."""
    for f in stdlib_files(split):
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield text
