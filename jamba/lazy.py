"""Lazy package exports (PEP 562), for the project's packages whose light modules must load without the heavy
ones (`parallel.config` and `data.config` without torch, so that a config typo is reported in a fraction of a
second): a package names what it exports and from which module, and each name is imported on first use.

    _EXPORTS = {"ParallelDims": "parallel.dims", ...}
    __all__ = list(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """The module-level `__getattr__` and `__dir__` of `package` for `exports` (name -> module)."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)  # imported once: later lookups find it directly
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
