"""Environment for the child processes that tests start (train.py, torchrun, rank scripts)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pythonpath(*first: os.PathLike) -> str:
    """The checkout (and `first`, e.g. a test's helper folder) ahead of the caller's own PYTHONPATH.

    The caller's entries are kept: where the dependencies come through PYTHONPATH (a machine with prebuilt
    CUDA packages in a folder of their own) a child given the checkout alone cannot import torch's extras."""
    return os.pathsep.join([str(ROOT), *map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])
