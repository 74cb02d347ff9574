"""What the data stream depends on, recorded in each checkpoint so that a resume can tell it changed.

A resumed loader position (file i, line j, shuffle buffer) only means the same thing with the same
tokenizer, the same sources in the same order with the same files, and the same loader settings. The
fingerprint is a small dict of those, compared key by key at resume: the error names what differs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, is_dataclass
from typing import Any, Dict, List, Optional

# Loader settings that change which tokens a position refers to (prefetch, doc_ids, the cache dir do not;
# data.num_workers and the data-parallel size do not either: the saved readers are dealt to the new layout).
_STREAM_KEYS = ("shuffle_buffer", "max_doc_chars", "validation_fraction")


def _as_dict(x: Any) -> Dict[str, Any]:
    if is_dataclass(x):
        return asdict(x)
    return dict(x)


def _files_digest(files: List[str]) -> str:
    """Names and sizes of the files, hashed: catches files added, removed, renamed or rewritten."""
    h = hashlib.sha1()
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:
            size = -1
        h.update(f"{os.path.basename(f)}\0{size}\n".encode())
    return f"{len(files)} files, {h.hexdigest()[:12]}"


def _source_files(src: Dict[str, Any]) -> Optional[List[str]]:
    if src.get("path"):
        from data.sources import expand_path

        return expand_path(src["path"])
    if src.get("builtin"):
        try:
            from data.sources import stdlib_files
        except ImportError:
            return None
        return list(stdlib_files("all"))
    return None  # a hub dataset: its name/subset/split are compared


def data_fingerprint(data_cfg: Any, tokenizer: Any = None) -> Dict[str, str]:
    cfg = _as_dict(data_cfg)
    fp: Dict[str, str] = {}
    if tokenizer is not None and hasattr(tokenizer, "fingerprint"):
        fp["tokenizer"] = tokenizer.fingerprint()
    for kind in ("sources", "validation_sources"):
        for i, src in enumerate(cfg.get(kind) or []):
            src = _as_dict(src)
            spec = {k: v for k, v in sorted(src.items()) if v is not None}
            fp[f"data.{kind}[{i}]"] = repr(spec)
            files = _source_files(src)
            if files is not None:
                fp[f"data.{kind}[{i}] files"] = _files_digest(files)
    for key in _STREAM_KEYS:
        if key in cfg:
            fp[f"data.{key}"] = repr(cfg[key])
    return fp


def describe_change(saved: Dict[str, str], now: Dict[str, str]) -> List[str]:
    """One short phrase per differing key."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a != b:
            out.append(f"{key}: {a if a is not None else '(absent)'} -> {b if b is not None else '(absent)'}")
    return out
