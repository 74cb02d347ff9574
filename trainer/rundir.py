"""Run directories named from the command line: deterministic (the same command resumes the same run), safe for
any override value, and unchanged by the options that do not change what is trained.

    python train.py                                  -> runs/cpu-demo/base
    python train.py model=small optim.lr=1e-3        -> runs/cpu-demo/model=small,optim.lr=0.001-3f2a9c1e
    python train.py 'data.sources=[{path: /d/*.jsonl}]' data.tokenizer=/d/tok.model
                                                     -> runs/cpu-demo/data.sources=_path_d_.jsonl_,data.tokenizer=_d_tok.model-<hash>

`conf/config.yaml` sets `hydra.run.dir: runs/${name}/${run_leaf:${hydra.overrides.task}}` (and the sweep subdir
the same way under `runs/${name}`, so a sweep point and the single run with the same overrides share one
directory). The leaf is a readable, sanitised short name (letters, digits and `._=,-` only: never a `/`,
never nested folders, at most ~80 characters) plus a hash of the full normalised overrides, so two different
runs never share a directory even when their short names are cut alike. Overrides are normalised through
Hydra's own parser and sorted, so `b=2 a=1` and `a=1 b=2`, or `optim.lr=1e-3` and `optim.lr=0.001`, are one run.

Keys that do not change *what* is trained are left out of the identity (`IGNORED_KEYS`, `IGNORED_PREFIXES`), so
that a finished run can be extended (`train.max_steps=12` after 10 steps continues the same directory from its
checkpoint; the learning-rate schedule is then computed for the new length) and operational settings can
change between restarts (checkpoint cadence and signals, logging, wandb, device, threads, compilation,
evaluation). `name` and `experiment` are not in the leaf because `name` is the level above it (every
experiment sets its own name). Give `hydra.run.dir=...` to choose a directory yourself (e.g. to continue a run
with another parallel layout: checkpoints reshard).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List

log = logging.getLogger(__name__)
BASE_LEAF = "base"
"""Leaf of a run with no identity-defining overrides."""
IGNORED_KEYS = frozenset({
    "name", "experiment",  # the directory level above / the recipe that sets it
    "train.max_steps",  # extend a run: continue the same directory
    "train.device", "train.num_threads", "train.compile", "train.deterministic",  # where and how fast, not what
    "train.eval_every", "train.eval_batches",  # validation only (its loaders are separate)
    "data.prefetch_factor",  # loader speed; data.num_workers does change the data order and stays
})
# Hydra itself; logging/wandb options; checkpointing (cadence, signals, resume/overwrite, verification: how a
# run is saved and continued, never what it computes)
IGNORED_PREFIXES = ("hydra.", "hydra/", "logging.", "checkpoint.")
MAX_SHORT = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key in ("logging", "checkpoint") or any(key.startswith(p) for p in IGNORED_PREFIXES)


def normalise(override: str) -> str:
    """`key=value` in Hydra's canonical text (value parsed, then printed), falling back to the raw text."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        o = OverridesParser.create().parse_override(override)
        prefix = override[:len(override) - len(override.lstrip("+~"))]
        if o.is_delete():
            return f"~{o.key_or_group}"
        return f"{prefix}{o.key_or_group}={o.get_value_element_as_str()}"
    except Exception:  # noqa: BLE001 - a leaf name must never fail; Hydra reports bad syntax itself
        return override.strip()


def identity(overrides: Iterable[str]) -> List[str]:
    """The overrides that define the run, normalised and sorted."""
    return sorted(normalise(o) for o in overrides if not ignored(_key(str(o))))


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


def run_leaf(overrides: Iterable[str]) -> str:
    """The run directory's last component for these command-line overrides (see the module docstring)."""
    ident = identity(str(o) for o in overrides)
    if not ident:
        return BASE_LEAF
    digest = hashlib.blake2b("\n".join(ident).encode(), digest_size=4).hexdigest()
    short = ",".join(_safe(o) for o in ident)
    if len(short) > MAX_SHORT:
        short = short[:MAX_SHORT].rstrip(",_")
    return f"{short}-{digest}"


def register_resolvers() -> None:
    """`${run_leaf:${hydra.overrides.task}}` for conf/config.yaml (call before Hydra resolves hydra.run.dir)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("run_leaf", lambda task: run_leaf(list(task or [])), replace=True)


def _flat(tree, prefix: str = "") -> Dict[str, object]:
    if isinstance(tree, dict):
        out: Dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


# Besides the leaf's ignored keys, what a resume may change on purpose: the parallel layout (checkpoints reshard;
# give hydra.run.dir=... to continue a run on another layout), the data workers (the readers are dealt anew),
# timeouts and memory housekeeping.
RESUMABLE_PREFIXES = ("parallel.",)
RESUMABLE_KEYS = frozenset({"data.num_workers", "train.collective_timeout_s", "train.gc_freeze",
                            "train.sharded_init"})


def config_changes(previous: Dict, current: Dict) -> List[str]:
    """What a restart changes of what the run trains: `key: old -> new` for every setting (nested dicts
    flattened; lists compared whole) that differs between the resolved config of the previous start and this
    one, leaving out the keys a restart may change (`ignored`: length, device, logging, checkpointing, ...; and
    the layout, data workers and timeouts: RESUMABLE_*)."""
    old, new = _flat(previous), _flat(current)
    changed = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(set(old) | set(new))
               if not ignored(k) and k not in RESUMABLE_KEYS and not k.startswith(RESUMABLE_PREFIXES)
               and old.get(k, "(unset)") != new.get(k, "(unset)")]
    return changed


def warn_config_changes(run_dir: Path, current: Dict, limit: int = 8) -> List[str]:
    """Log a warning naming what this start changes of the run directory's previous start (its config.yaml,
    written by train.py once a start has restored or begun); returns the changes."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    try:
        from omegaconf import OmegaConf

        previous = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - a damaged copy only costs the comparison
        log.warning("could not read %s (%s): not comparing this start's settings with it", path, e)
        return []
    changes = config_changes(previous, current) if isinstance(previous, dict) else []
    if changes:
        more = f"; ... {len(changes) - limit} more" if len(changes) > limit else ""
        log.warning("this start changes %d setting(s) of %s's previous start; a resume goes on with the new values "
                    "(a different run wants its own directory): %s%s", len(changes), run_dir,
                    "; ".join(changes[:limit]), more)
    return changes